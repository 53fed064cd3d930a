"""The two entry points, each a short composition of the stages (source -> selector -> writer):

* :func:`prune_`: prune a ``transformers`` model in memory, in place; returns what was kept.
* :func:`compress`: a model folder (or the embedded model, or a hub id) to a pruned, stock-loadable folder:
  output claimed -> source planned (streaming or in memory) -> selected -> sliced -> written with its
  manifest. Under ``torchrun`` the stages split layers and shards across ranks with one process's result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .checkpoint import POLICY_FILE, kept_indices_to_json, save_policy, write_manifest
from .config import DEFAULT_MODEL, CompressConfig, PruneConfig, check_ratios, config_from
from .distributed import Distributed
from .output import OutputFolder, check_existing_output, check_output_path, claim_output, partial_folder
from .resolve import resolve_model
from .scores import SCORES_FILE
from .selectors import SELECTORS, Selection, select, selector_of
from .sources import ModelSource, Source, check_prunable, plan_source
from .validate import check_finite_weights, resolve_device
from .widths import reached_ratio
from .writers import writer_for

__all__ = ["CompressResult", "PruneResult", "compress", "prune_"]

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """What was kept, and the numbers the manifest records.

    Attributes:
        keeps: per layer, the sorted ``(k,)`` int64 indices of the kept FFN neurons.
        policy: the PruneNet policy that chose them (``--method prunenet``), else ``None``.
        training: the policy-training trace (``None`` when nothing was trained).
        attention: the attention slicing's record (``--modules ffn+attn``), else ``None``.
        selector_record: the selector's own manifest fields (``--calibration``: the text's files and windows).
        scores: the activation scores the neurons were ranked by (``selfcal``; :class:`prunenet.scores.NeuronScores`,
            ``scores.save(path)`` writes what ``scores=`` reads), else ``None``.
    """

    config: PruneConfig
    model_type: str
    ffn_width: int
    keeps: list[torch.Tensor]
    params_before: int
    params_after: int
    policy: object = None
    training: dict | None = None
    attention: dict | None = None
    selector_record: dict = field(default_factory=dict)
    scores: object = None

    @property
    def k(self) -> int:
        return self.keeps[0].numel()

    def manifest(self) -> dict:
        """The manifest fields of the pruning itself (:func:`compress` adds the source and the output's)."""
        c = self.config
        return {
            "model_type": self.model_type,
            "ratio": c.ratio,
            "ffn_width_before": self.ffn_width,
            "k": self.k,
            "width_multiple": c.width_multiple,
            "ratio_reached": reached_ratio(self.k, self.ffn_width),
            "method": c.method,
            "method_options": _method_options(c),
            "selection": c.selection if "selection" in SELECTORS[c.method].options else None,
            "seed": c.seed,
            "policy": POLICY_FILE if self.policy is not None else None,
            "scores": SCORES_FILE if self.scores is not None else None,
            "policy_source": str(c.policy) if c.policy is not None else None,
            "training": self.training,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "kept_indices": kept_indices_to_json(self.keeps),
            "modules": c.modules,
            "attention": self.attention,
            **self.selector_record,
        }


def _method_options(config: PruneConfig) -> dict:
    """The method's own options, for the manifest. ``calibration`` only when given: a run on self-generated
    probes records what it always has."""
    options = {name: _json_value(getattr(config, name)) for name in SELECTORS[config.method].options}
    if "calibration" in options and options["calibration"] is None:
        del options["calibration"]
    return options


def _json_value(value):
    """Paths (``--policy``) as strings and tuples (``--calibration``) as lists, for the manifest."""
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _prune(source: Source, config: PruneConfig, prepared: dict, dist: Distributed, progress: bool, timings: dict):
    """Select on ``source`` (``prepared``: what the selector's ``prepare`` returned) and apply the choice (in
    place, or deferred to the shard writer).

    Returns ``(result, writer)``; the caller closes the writer once it has written (or failed to): it holds the
    refitted columns (``--compensate``), spilled to a temporary folder when streaming."""
    params_before, width = source.numel(), source.width  # before slicing changes the config's width
    tick = time.perf_counter()
    selection: Selection = select(source, config, dist=dist, progress=progress, **prepared)
    timings["select_s"] = time.perf_counter() - tick  # training (if any) included
    timings.update(selection.timings)
    if selection.train_seconds is not None:
        timings["train_s"] = selection.train_seconds
    tick = time.perf_counter()
    writer = writer_for(source, selection.columns)
    try:
        attention = writer.apply(selection.keeps, config, progress)
    except BaseException:
        writer.close()
        raise
    k = selection.keeps[0].numel()
    result = PruneResult(config, source.config.model_type, width, selection.keeps, params_before,
                         writer.params_after(k), selection.policy, selection.training, attention,
                         selection.manifest, selection.scores)  # fmt: skip
    timings["slice_s"] = time.perf_counter() - tick
    return result, writer


def _prepare(config: PruneConfig, adapter, model_config, device, tokenizer) -> tuple[PruneConfig, dict]:
    """The selector's checks and loads that must come before any weights (e.g. ``--policy``, ``--calibration``,
    ``--scores``; ``tokenizer()`` loads the model's tokenizer, for a selector that reads text): the config to run
    (with ``--scores``: the probe settings the scores were measured with) and keyword arguments for the
    selector's ``choose``."""
    prepare = SELECTORS[config.method].prepare
    prepared = prepare(config, adapter, model_config, str(device), tokenizer) if prepare is not None else {}
    return prepared.pop("config", config), prepared


def prune_(
    model: torch.nn.Module, ratio: float | None = None, *, config: PruneConfig | None = None, progress: bool = False,
    tokenizer=None, **options,
) -> PruneResult:  # fmt: skip
    """Prune the FFN of every block of an in-memory ``transformers`` causal LM at ``ratio``, in place.

    ``options`` are :class:`~prunenet.config.PruneConfig` fields (``method="selfcal"``, ``seed=3``,
    ``episodes=5``, ``modules="ffn+attn"``, ...), applied over ``config``. ``tokenizer``: the model's, which
    ``calibration=`` needs to cut its text into token windows. The model's config afterwards holds the new
    FFN width, so ``model.save_pretrained`` writes a model stock ``transformers`` reloads.

    Raises:
        ValueError (and its subclasses): the same one-line errors as the command line.
    """
    config = config_from(PruneConfig, config, **({"ratio": ratio} if ratio is not None else {}), **options)
    selector_of(config)  # an unknown --method, before any work
    if config.calibration is not None and tokenizer is None:
        raise ValueError("calibration= needs the model's tokenizer to cut the text into tokens: pass tokenizer=")
    check_finite_weights(model)  # a folder's model is checked by load_model; the caller's here
    source = ModelSource(model, tokenizer=tokenizer)
    check_prunable(config, source.adapter, source.config)
    device = next(model.parameters()).device
    config, prepared = _prepare(config, source.adapter, source.config, device, lambda: tokenizer)
    result, writer = _prune(source, config, prepared, Distributed(), progress, {})
    writer.close()  # the refitted columns are in the model now
    return result


@dataclass
class CompressResult:
    """What :func:`compress` did: sizes, timings and where the output is."""

    out: Path
    model_type: str
    ffn_width: int
    k: int
    params_before: int
    params_after: int
    timings: dict[str, float] = field(default_factory=dict)
    best_reward: float | None = None
    streaming: bool = False
    recovery: dict | None = None  # --recover: the self-distillation's record (steps, losses, timings)
    method: str = ""
    ratio: float = 0.0
    scored_from: str | None = None  # --scores: the file the neurons were ranked from


def compress(
    model: str | Path = DEFAULT_MODEL, out: str | Path | None = None, ratio: float | Sequence[float] | None = None,
    *, config: CompressConfig | None = None, progress: bool = True, dist: Distributed | None = None, **options,
) -> CompressResult | list[CompressResult]:  # fmt: skip
    """Prune ``model`` (the embedded model's name, a local folder or a hub id) at ``ratio`` into ``out``.

    Several ratios (a list or tuple) write one complete model per ratio into ``out/r0.1``, ``out/r0.2``, ...
    and return their results in the order given (:func:`_compress_ratios`).

    ``options`` are :class:`~prunenet.config.CompressConfig` fields, applied over ``config``. Everything,
    the output folder included (:mod:`prunenet.output`), is checked before any weights are loaded; the
    output appears only when complete. Streaming (``streaming``, ``max_memory``) reads a safetensors
    checkpoint tensor by tensor (:mod:`prunenet.streaming`) with the same result as the in-memory path.
    ``dist`` (from :func:`prunenet.distributed.init` under ``torchrun``) splits layers and shards across
    the ranks, with a single process's result; rank 0 writes the rest and renames the folder.
    ``recover=True`` then self-distils the pruned model from ``model`` (:meth:`CompressConfig.recovery_config`,
    no dataset) before it becomes ``out``, as ``prunenet finetune --teacher`` would on the pruned folder.
    """
    if out is None:
        raise TypeError("compress() needs out=, the folder to write the pruned model to")
    if isinstance(ratio, list | tuple):
        return _compress_ratios(model, out, check_ratios(ratio), config, progress, dist, options)
    config = config_from(CompressConfig, config, **({"ratio": ratio} if ratio is not None else {}), **options)
    selector_of(config)  # an unknown --method, before any work
    config = dataclasses.replace(config, device=resolve_device(config.device))
    dist = dist or Distributed()
    if dist.active and config.streaming is False:
        raise ValueError("a distributed run (torchrun) streams the checkpoint: drop --no-streaming")
    if config.recover and dist.active:
        raise ValueError("--recover runs in one process: compress under torchrun, then run `prunenet finetune "
                         "--teacher` on the output")  # fmt: skip
    if config.recover:
        from .lora import require_peft

        require_peft()  # before any work
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    path = resolve_model(model)
    # Rank 0 writes the output and holds its lock; the other ranks only need its (checked) path.
    claim = claim_output(out, sources=[path], overwrite=config.overwrite) if dist.is_main else contextlib.nullcontext()
    recovery = None
    with claim as target:
        if not config.recover:
            out = target.path if target is not None else check_output_path(out, [path])
            result, streaming = _compress_into(target, out, model, path, config, dist, progress, timings, tick)
        else:  # prune into a staging folder beside --out, then recover from it into --out
            with target.staging() as stage:
                pruned = OutputFolder(stage / "pruned", overwrite=False)
                result, streaming = _compress_into(pruned, pruned.path, model, path, config, dist, progress, timings,
                                                tick)  # fmt: skip
                recovery = _recover(target, pruned.path, model, path, config, progress, timings)
            out = target.path
    best = result.training["best_reward"] if result.training else None
    return CompressResult(out, result.model_type, result.ffn_width, result.k, result.params_before,
                          result.params_after, timings, best, streaming, recovery, result.config.method,
                          result.config.ratio, result.config.scores)  # fmt: skip


def ratio_folder(ratio: float) -> str:
    """The name of ratio ``ratio``'s output inside a several-ratio run's ``--out``: ``r0.1``."""
    return f"r{float(ratio)}"


def _compress_ratios(model, out, ratios: tuple[float, ...], config: CompressConfig | None, progress: bool,
                     dist: Distributed | None, options: dict) -> list[CompressResult]:  # fmt: skip
    """:func:`compress` at each of ``ratios`` into ``out/r<ratio>``, in the order given.

    Everything is checked before any work (the options, and every output folder as :func:`compress` checks one).
    With ``selfcal`` the first ratio that prunes scores the neurons and saves them in its output; every later
    ratio is cut from those scores (``scores=``), so the model runs once (again only to compensate). Each output
    is complete on its own: a ratio that fails is logged and the others go on; the first failure is raised at
    the end, once every ratio has been tried. ``out`` is created if missing, and removed again if it stays empty.
    """
    base = config_from(CompressConfig, config, ratio=ratios[0], **options)
    selector_of(base)
    dist = dist or Distributed()
    path = resolve_model(model)
    out = check_output_path(out, [path])
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder: several ratios need a folder to hold r0.1, ...")
    for ratio in ratios:
        if dist.is_main and out.is_dir():
            check_existing_output(check_output_path(out / ratio_folder(ratio), [path]), base.overwrite)
    created = dist.is_main and not out.exists()
    if dist.is_main:
        out.mkdir(exist_ok=True)
    dist.barrier()  # the folder exists on every rank
    results, failures = [], []
    scores = base.scores
    try:
        for ratio in ratios:
            target = out / ratio_folder(ratio)
            try:
                result = compress(model, target, config=dataclasses.replace(base, ratio=ratio, scores=scores),
                                  progress=progress, dist=dist)  # fmt: skip
            except Exception as err:  # noqa: BLE001 (the other ratios' outputs still come; raised below)
                log.error("ratio %s failed, %s not written: %s", ratio, target, err)
                failures.append(err)
                continue
            results.append(result)
            if scores is None and (result.out / SCORES_FILE).is_file():
                scores = str(result.out / SCORES_FILE)
                log.info("the other ratios are cut from the scores in %s", scores)
    finally:
        if created and not any(out.iterdir()):
            out.rmdir()
    if failures:
        raise failures[0]
    return results


def _compress_into(
    target: OutputFolder | None,
    out: Path,
    model,
    path: Path,
    config: CompressConfig,
    dist: Distributed,
    progress: bool,
    timings: dict,
    tick: float,
) -> tuple[PruneResult, bool]:
    """:func:`compress` once ``target`` (``None`` on ranks other than 0) is claimed: plan, select, write.

    Returns what was kept and whether the source was streamed; the model itself is not kept alive.
    """
    plan = plan_source(path, config, dist)
    from .models import read_tokenizer

    config, prepared = _prepare(config, plan.adapter, plan.config, config.device, lambda: read_tokenizer(path))
    needed = plan.output_bytes_at_least() if target is not None else None
    if needed is not None:
        target.ensure_space(needed)
    source = plan.open()
    timings["load_s"] = time.perf_counter() - tick
    log.info("selecting with --method %s at ratio %s (%s)", config.method, config.ratio,
             "streaming" if source.streaming else "in memory")  # fmt: skip
    result, writer = _prune(source, config, prepared, dist, progress, timings)
    try:
        log.info("writing %s", out)
        manifest = {
            "prunenet_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source_model": str(model),
            "source_path": str(path),
            **result.manifest(),
            "streaming": source.streaming,
            "memory_plan": dataclasses.asdict(source.memory_plan) if source.memory_plan is not None else None,
        }
        _write(target, out, writer, result, manifest, dist, progress, timings)
    finally:
        writer.close()  # the refitted columns' temporary folder, on every rank
    return result, source.streaming


def _recover(target: OutputFolder, pruned: Path, model, path: Path, config: CompressConfig, progress: bool,
             timings: dict) -> dict:  # fmt: skip
    """``--recover``: self-distil the pruned model in ``pruned`` from the source model at ``path`` into ``target``.

    Returns the recovery's record (steps, losses, timings); its timings are in the manifest's ``finetune``.
    """
    from .finetune import finetune_into

    tick = time.perf_counter()
    log.info("recovering by self-distillation from %s (%d steps at most)", model, config.recover_steps)
    dtype = config.dtype if config.dtype != "auto" else "fp32"
    result = finetune_into(target, pruned, model="this compress run's pruned model", text_file=None,
                           teacher=(str(model), path), cfg=config.recovery_config(), eval_tokens=0, eval_context=0,
                           device=str(config.device), dtype=dtype, progress=progress, staged=True)  # fmt: skip
    timings["recover_s"] = time.perf_counter() - tick
    return {**result.info, "timings_s": result.timings}


def _write(target, out: Path, writer, result: PruneResult, manifest: dict, dist: Distributed, progress: bool,
           timings: dict) -> None:  # fmt: skip
    """Write the pruned model, its policy and the manifest; rank 0 renames the folder into place."""
    tick = time.perf_counter()
    key = writer.resume_key(result.keeps)
    with contextlib.ExitStack() as stack:
        # Rank 0 owns the temporary folder; it becomes `out` once every rank's shards are in it.
        tmp = stack.enter_context(target.write(resume=key)) if dist.is_main else partial_folder(out, key)
        dist.barrier()  # the folder exists
        writer.save(tmp, result.keeps, dist, progress)
        if dist.is_main:
            if result.policy is not None:
                metadata = {"source_model": manifest["source_model"], "ratio": str(result.config.ratio)}
                save_policy(result.policy, tmp / POLICY_FILE, metadata)
            if result.scores is not None:
                result.scores.save(tmp / SCORES_FILE)
            timings["save_s"] = time.perf_counter() - tick
            write_manifest(tmp, {**manifest, "timings_s": timings})
    dist.barrier()  # every rank returns with the output in place
    timings.setdefault("save_s", time.perf_counter() - tick)
