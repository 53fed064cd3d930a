"""``compress``: load a model, choose the FFN neurons to keep, slice, and save a stock-loadable model."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig

from . import __version__
from .adapters import get_adapter
from .attention import check_modules, slice_attention_by_ratio_
from .checkpoint import POLICY_FILE, kept_indices_to_json, load_policy, save_policy, write_manifest
from .distributed import Distributed
from .methods import SHIPPED as SHIPPED_METHODS
from .methods import choose as choose_method
from .models import ModelLoadError, load_model, resolve_model
from .output import check_output_path, claim_output, partial_folder
from .policy import SELECTIONS, SparsityPredictor, check_policy_shape, select_rows, skip_selection
from .reward import BACKENDS as REWARD_BACKENDS
from .reward import resolve_backend, state_shape
from .slicing import slice_model_
from .streaming import (
    CheckpointError,
    CheckpointSource,
    CheckpointStates,
    finish_checkpoint,
    free_memory,
    parse_size,
    plan_memory,
    pruned_numel,
    resume_key,
    write_pruned_checkpoint,
)
from .train import TrainConfig, train_policy
from .validate import check_count, check_device, check_finite, check_number, check_seed

log = logging.getLogger(__name__)

METHODS = ("prunenet", "random", "magnitude", *SHIPPED_METHODS)  # the others: prunenet/methods.py
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# compress's --dtype also takes "auto": the dtype the checkpoint stores its FFN weights in.
COMPRESS_DTYPES = ("auto", *DTYPES)


def kept_width(ratio: float, width: int) -> int:
    """``k = floor((1 - ratio) * n)``, robust to float rounding (``(1 - 0.3) * 10`` is ``6.99..``)."""
    return math.floor((1.0 - ratio) * width + 1e-9)


def check_ratio(ratio: float) -> None:
    """Raise ``ValueError`` unless ``0 <= ratio < 1``."""
    if not (isinstance(ratio, int | float) and 0.0 <= ratio < 1.0):
        raise ValueError(f"--ratio must be in [0, 1), got {ratio}")


def choose_keeps(
    method: str,
    states: Sequence[torch.Tensor],
    k: int,
    *,
    policy: SparsityPredictor | None = None,
    selection: str = "sample",
    seed: int = 0,
    dist: Distributed | None = None,
    model: torch.nn.Module | None = None,
) -> list[torch.Tensor]:
    """Kept neurons per layer: sorted ``(k,)`` int64 CPU vectors, one per state matrix ``(n, d)``.

    ``prunenet`` scores rows with ``policy`` and applies ``selection``; ``random`` draws ``k`` rows
    uniformly (seeded); ``magnitude`` keeps the ``k`` rows of largest L2 norm; ``selfcal`` runs ``model``
    forward on text it generates itself (:mod:`prunenet.methods`; ``states`` unused). With ``dist`` (a
    ``torchrun`` job) each rank reads only its own layers, keeps the seeded draws of the others in
    step, and the ranks exchange their layers' indices: every rank returns all ``L`` vectors, equal
    to a single process's.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in SHIPPED_METHODS:  # e.g. selfcal: runs the instantiated ``model`` forward (prunenet/methods.py)
        return choose_method(method, k, model=model, seed=seed)
    dist = dist or Distributed()
    (n, _), _ = state_shape(states)
    owned = dist.owned_layers(len(states))
    generator = torch.Generator().manual_seed(seed)
    keeps: list[torch.Tensor | None] = []
    for i in range(len(states)):
        if method == "random":  # needs no weights: every rank draws every layer
            keeps.append(torch.randperm(n, generator=generator)[:k].sort().values)
        elif i not in owned:
            if method == "prunenet":
                skip_selection(n, selection, generator)
            keeps.append(None)
        elif method == "prunenet":
            with torch.no_grad():
                logits = policy.logits(states[i].to(next(policy.parameters()).device)).cpu()
            keeps.append(select_rows(logits, k, selection, generator))
        else:  # magnitude
            keeps.append(torch.topk(states[i].float().norm(dim=1).cpu(), k).indices.sort().values)
    if dist.active and method != "random":
        table = torch.zeros(len(states), k, dtype=torch.int64)
        for i in owned:
            table[i] = keeps[i]
        keeps = list(dist.all_reduce_sum(table))  # each row has one non-zero contributor: exact
    return keeps


def weight_bytes(checkpoint: CheckpointSource, dtype: str = "auto") -> int:
    """Bytes of the checkpoint's weights once loaded in ``dtype`` (``"auto"``: as stored)."""
    itemsize = DTYPES[dtype].itemsize if dtype != "auto" else None
    return sum(e.numel * (itemsize or e.dtype.itemsize) for e in checkpoint.entries.values())


def _use_streaming(
    streaming: bool | None,
    checkpoint: CheckpointSource | None,
    source: Path,
    dtype: str,
    budget: int,
    modules: str,
    method: str,
) -> bool:
    """Streaming or in-memory: forced by ``streaming``, else streaming when the weights exceed ``budget``."""
    needs_model = (
        f"--modules {modules}" if modules != "ffn" else f"--method {method}" if method in SHIPPED_METHODS else ""
    )
    if streaming:
        if checkpoint is None:
            raise ValueError(f"--streaming needs safetensors weights, and {source} has none; use --no-streaming")
        if needs_model:  # attention slicing and self-calibration run the instantiated model
            raise ValueError(f"{needs_model} needs the instantiated model: it cannot stream (use --no-streaming)")
        return True
    if streaming is False or checkpoint is None or needs_model:
        return False
    model_bytes = weight_bytes(checkpoint, dtype)
    if model_bytes <= budget:
        return False
    log.info(
        "the weights (%.2f GiB) exceed the memory budget (%.2f GiB): streaming", model_bytes / 2**30, budget / 2**30
    )
    return True


def _stored_dtype(checkpoint: CheckpointSource | None, adapter, config) -> torch.dtype:
    """``--dtype auto``: the FFN weights' stored dtype (safetensors), else the config's, else float32."""
    if checkpoint is not None:
        stored = checkpoint.state_dtype(adapter)
        if stored.is_floating_point:
            return stored
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) and declared.is_floating_point else torch.float32


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


def compress(
    *,
    model: str,
    ratio: float,
    out: str | Path,
    method: str = "prunenet",
    episodes: int = 20,
    policy: str | Path | None = None,
    selection: str = "sample",
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "auto",
    kl_weight: float = 0.0,
    lr: float = 1e-3,
    reward_backend: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    modules: str = "ffn",
    streaming: bool | None = None,
    max_memory: str | int | None = None,
    dist: Distributed | None = None,
) -> CompressResult:
    """Prune the FFN of every block of ``model`` at ``ratio`` and save the result to ``out``.

    Every argument, and the output folder, is checked before any weights are loaded; the output
    folder appears only when it is complete, and only a folder prunenet wrote is ever replaced (with
    ``overwrite``; see :mod:`prunenet.output`). ``modules="ffn+attn"`` also
    removes whole key/value head groups of the attention at the same ratio (see :mod:`prunenet.attention`).

    ``streaming`` (``None``: automatic) works on the safetensors checkpoint tensor by tensor, without
    instantiating the model (see :mod:`prunenet.streaming`); automatic means streaming when the folder
    holds safetensors weights that do not fit ``max_memory`` (bytes or e.g. ``"4GiB"``; default: the
    device's free memory). Both paths give the same kept neurons and the same tensors for a seed.

    ``dist`` (from :func:`prunenet.distributed.init` under ``torchrun``) splits the layers across the
    ranks: each streams only its layers' state matrices and writes its share of the shards; rank 0
    writes the rest and renames the folder. The result equals a single process's. Every rank returns.
    """
    dist = dist or Distributed()
    if dist.active and streaming is False:
        raise ValueError("a distributed run (torchrun) streams the checkpoint: drop --no-streaming")
    check_ratio(ratio)
    if method not in METHODS:
        raise ValueError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown --selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
    if dtype not in COMPRESS_DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; choose one of {', '.join(COMPRESS_DTYPES)}")
    check_device(device)
    budget = parse_size(max_memory) if max_memory is not None else free_memory(device)
    check_count("--episodes", episodes)
    check_seed(seed)
    check_number("--kl", kl_weight, minimum=0.0)
    check_number("--lr", lr, positive=True)
    if policy is not None and method != "prunenet":
        raise ValueError("--policy applies only to --method prunenet")
    if reward_backend not in REWARD_BACKENDS:
        raise ValueError(f"unknown --reward-backend {reward_backend!r}; choose one of {', '.join(REWARD_BACKENDS)}")
    if method == "prunenet" and policy is None:
        resolve_backend(reward_backend, device)  # e.g. triton without CUDA: say so before loading weights

    timings: dict[str, float] = {}
    tick = time.perf_counter()
    source = resolve_model(model)
    # Rank 0 writes the output and holds its lock; the other ranks only need its (checked) path.
    claim = claim_output(out, sources=[source], overwrite=overwrite) if dist.is_main else contextlib.nullcontext()
    with claim as target:
        out = target.path if target is not None else check_output_path(out, [source])
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError, KeyError) as err:
            raise ModelLoadError(f"could not read the model config in {source}: {err}") from None
        adapter = get_adapter(config)
        check_modules(modules, adapter, config)
        width, hidden = adapter.ffn_width(config), adapter.hidden_size(config)
        k = kept_width(ratio, width)
        if k < 1:
            raise ValueError(f"--ratio {ratio} leaves no FFN neurons (FFN width {width})")
        trained_policy = load_policy(policy) if policy is not None else None
        if trained_policy is not None:
            check_policy_shape(trained_policy, hidden, width)

        try:
            checkpoint = CheckpointSource(source) if CheckpointSource.has_safetensors(source) else None
        except CheckpointError as err:
            raise ModelLoadError(f"the weights in {source} are truncated or corrupt: {err}") from None
        if target is not None and checkpoint is not None:
            # A lower bound of the output's size: no model shrinks by more than the ratio.
            target.ensure_space(math.floor((1 - ratio) * weight_bytes(checkpoint, dtype)))
        plan = None
        if _use_streaming(True if dist.active else streaming, checkpoint, source, dtype, budget, modules, method):
            checkpoint.ffn_tensors(adapter, config)  # every FFN tensor present, with the config's width
            stored = checkpoint.state_dtype(adapter)
            if dtype != "auto" and DTYPES[dtype] != stored:
                raise ValueError(
                    f"streaming copies tensors as stored ({stored}); --dtype {dtype} would need a conversion: "
                    "drop --dtype (or pass --dtype auto), or use --no-streaming"
                )
            owned = dist.owned_layers(adapter.num_layers(config))
            plan = plan_memory(len(owned), width, hidden, stored.itemsize, k, budget, device)
            log.info("streaming %s tensor by tensor; %s", source, plan.describe())
            lm = tokenizer = None
            states = CheckpointStates(checkpoint, adapter, config, device, plan.states, layers=owned)
            params_before = checkpoint.numel()
        else:
            load_dtype = DTYPES[dtype] if dtype != "auto" else _stored_dtype(checkpoint, adapter, config)
            lm, tokenizer, _ = load_model(str(source), device=device, dtype=load_dtype)
            params_before = sum(p.numel() for p in lm.parameters())
            states = [adapter.layer_state(lm, i) for i in range(adapter.num_layers(config))]
            for i, state in enumerate(states):
                check_finite(state, adapter.block_prefix(i) + adapter.tensors[0].name)
        timings["load_s"] = time.perf_counter() - tick

        train_info = None
        tick = time.perf_counter()
        if k == width:
            log.info("ratio %s keeps all %d FFN neurons: nothing to select or train", ratio, width)
            keeps = [torch.arange(width)] * len(states)
        else:
            if method == "prunenet" and trained_policy is None:
                cfg = TrainConfig(
                    episodes=episodes, seed=seed, kl_weight=kl_weight, lr=lr, reward_backend=reward_backend
                )
                result = train_policy(
                    states,
                    k,
                    cfg,
                    progress=progress and dist.is_main,
                    spill_grams=plan is not None and plan.grams == "disk",
                    dist=dist,
                )
                trained_policy = result.policy
                train_info = {
                    "episodes": episodes,
                    "best_episode": result.best_episode,
                    "best_reward": result.best_reward,
                    "episode_rewards": result.episode_rewards,
                    "reward_backend": result.reward_backend,
                    **{f"config_{key}": value for key, value in vars(cfg).items()},
                }
                timings["train_s"] = time.perf_counter() - tick
                tick = time.perf_counter()
            keeps = choose_keeps(
                method, states, k, policy=trained_policy, selection=selection, seed=seed, dist=dist, model=lm
            )
        if plan is not None:
            states.close()
            attention_info = None
            # Streaming slices each FFN tensor as the writer reads it: see timings["save_s"].
            params_after = pruned_numel(checkpoint, adapter, config, k)
        else:
            del states  # views of weights that slicing replaces
            slice_model_(lm, adapter, keeps, progress=progress)
            attention_info = slice_attention_by_ratio_(lm, adapter, ratio, progress) if modules == "ffn+attn" else None
            params_after = sum(p.numel() for p in lm.parameters())
        timings["slice_s"] = time.perf_counter() - tick

        tick = time.perf_counter()
        manifest = {
            "prunenet_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source_model": model,
            "source_path": str(source),
            "model_type": config.model_type,
            "ratio": ratio,
            "ffn_width_before": width,
            "k": k,
            "method": method,
            "selection": selection if method == "prunenet" else None,
            "seed": seed,
            "policy": POLICY_FILE if trained_policy is not None else None,
            "policy_source": str(policy) if policy is not None else None,
            "training": train_info,
            "params_before": params_before,
            "params_after": params_after,
            "kept_indices": kept_indices_to_json(keeps),
            "modules": modules,
            "attention": attention_info,
            "streaming": plan is not None,
            "memory_plan": dataclasses.asdict(plan) if plan is not None else None,
        }
        # A streaming run killed half-way (SIGKILL, power loss) leaves its finished shards in a folder named
        # after its inputs, and the same command resumes from them; the in-memory path has nothing to resume.
        key = resume_key(checkpoint, keeps) if plan is not None else None
        with contextlib.ExitStack() as stack:
            # Rank 0 owns the temporary folder; it becomes `out` once every rank's shards are in it.
            tmp = stack.enter_context(target.write(resume=key)) if dist.is_main else partial_folder(out, key)
            dist.barrier()  # the folder exists
            if plan is not None:
                shards = dist.owned_shards(list(checkpoint.shard_entries))
                try:
                    write_pruned_checkpoint(
                        checkpoint, adapter, config, keeps, tmp, shards=shards, finish=False, progress=progress
                    )
                except BaseException:
                    with contextlib.suppress(Exception):  # the group may be broken already
                        dist.agree(False, "writing shards")
                    raise
                dist.agree(True, "writing shards")  # raises on every rank if one failed: rank 0 then cleans up
                if dist.is_main:
                    finish_checkpoint(checkpoint, adapter, config, k, tmp)
            else:
                lm.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            if dist.is_main:
                if trained_policy is not None:
                    save_policy(trained_policy, tmp / POLICY_FILE, {"source_model": model, "ratio": str(ratio)})
                timings["save_s"] = time.perf_counter() - tick
                write_manifest(tmp, {**manifest, "timings_s": timings})
        dist.barrier()  # every rank returns with the output in place
        timings.setdefault("save_s", time.perf_counter() - tick)
        return CompressResult(
            out=out,
            model_type=config.model_type,
            ffn_width=width,
            k=k,
            params_before=params_before,
            params_after=params_after,
            timings=timings,
            best_reward=train_info["best_reward"] if train_info else None,
            streaming=plan is not None,
        )
