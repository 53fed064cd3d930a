"""``compress``: load a model, choose the FFN neurons to keep, slice, and save a stock-loadable model."""

from __future__ import annotations

import datetime
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig

from . import __version__
from .adapters import get_adapter
from .attention import check_modules, slice_attention_by_ratio_
from .checkpoint import (
    POLICY_FILE,
    atomic_folder,
    check_output_folder,
    kept_indices_to_json,
    load_policy,
    save_policy,
    write_manifest,
)
from .models import ModelLoadError, load_model, resolve_model
from .policy import SELECTIONS, SparsityPredictor, check_policy_shape, select_rows
from .reward import BACKENDS as REWARD_BACKENDS
from .reward import resolve_backend
from .slicing import slice_model_
from .train import TrainConfig, train_policy

log = logging.getLogger(__name__)

METHODS = ("prunenet", "random", "magnitude")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def kept_width(ratio: float, width: int) -> int:
    """``k = floor((1 - ratio) * n)``, robust to float rounding (``(1 - 0.3) * 10`` is ``6.99..``)."""
    return math.floor((1.0 - ratio) * width + 1e-9)


def check_ratio(ratio: float) -> None:
    """Raise ``ValueError`` unless ``0 <= ratio < 1``."""
    if not (isinstance(ratio, int | float) and 0.0 <= ratio < 1.0):
        raise ValueError(f"--ratio must be in [0, 1), got {ratio}")


def choose_keeps(
    method: str,
    states: list[torch.Tensor],
    k: int,
    *,
    policy: SparsityPredictor | None = None,
    selection: str = "sample",
    seed: int = 0,
) -> list[torch.Tensor]:
    """Kept neurons per layer: sorted ``(k,)`` int64 CPU vectors, one per state matrix ``(n, d)``.

    ``prunenet`` scores rows with ``policy`` and applies ``selection``; ``random`` draws ``k`` rows
    uniformly (seeded); ``magnitude`` keeps the ``k`` rows of largest L2 norm.
    """
    generator = torch.Generator().manual_seed(seed)
    keeps = []
    for w in states:
        if method == "prunenet":
            with torch.no_grad():
                logits = policy.logits(w.to(next(policy.parameters()).device)).cpu()
            keeps.append(select_rows(logits, k, selection, generator))
        elif method == "random":
            keeps.append(torch.randperm(w.shape[0], generator=generator)[:k].sort().values)
        elif method == "magnitude":
            keeps.append(torch.topk(w.float().norm(dim=1).cpu(), k).indices.sort().values)
        else:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return keeps


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
    dtype: str = "fp32",
    kl_weight: float = 0.0,
    lr: float = 1e-3,
    reward_backend: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    modules: str = "ffn",
) -> CompressResult:
    """Prune the FFN of every block of ``model`` at ``ratio`` and save the result to ``out``.

    Every argument is validated before any weights are loaded; the output folder appears only
    when it is complete (see :func:`~prunenet.checkpoint.atomic_folder`). ``modules="ffn+attn"`` also
    removes whole key/value head groups of the attention at the same ratio (see :mod:`prunenet.attention`).
    """
    check_ratio(ratio)
    if method not in METHODS:
        raise ValueError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown --selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if episodes < 1:
        raise ValueError(f"--episodes must be at least 1, got {episodes}")
    if policy is not None and method != "prunenet":
        raise ValueError("--policy applies only to --method prunenet")
    if reward_backend not in REWARD_BACKENDS:
        raise ValueError(f"unknown --reward-backend {reward_backend!r}; choose one of {', '.join(REWARD_BACKENDS)}")
    if method == "prunenet" and policy is None:
        resolve_backend(reward_backend, device)  # e.g. triton without CUDA: say so before loading weights

    timings: dict[str, float] = {}
    tick = time.perf_counter()
    source = resolve_model(model)
    out = check_output_folder(out, source, overwrite)
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

    lm, tokenizer, _ = load_model(str(source), device=device, dtype=DTYPES[dtype])
    params_before = sum(p.numel() for p in lm.parameters())
    timings["load_s"] = time.perf_counter() - tick

    states = [adapter.layer_state(lm, i) for i in range(adapter.num_layers(config))]
    train_info = None
    tick = time.perf_counter()
    if k == width:
        log.info("ratio %s keeps all %d FFN neurons: nothing to select or train", ratio, width)
        keeps = [torch.arange(width)] * len(states)
    else:
        if method == "prunenet" and trained_policy is None:
            cfg = TrainConfig(episodes=episodes, seed=seed, kl_weight=kl_weight, lr=lr, reward_backend=reward_backend)
            result = train_policy(states, k, cfg, progress=progress)
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
        keeps = choose_keeps(method, states, k, policy=trained_policy, selection=selection, seed=seed)
    del states  # views of weights that slicing replaces
    slice_model_(lm, adapter, keeps, progress=progress)
    attention_info = slice_attention_by_ratio_(lm, adapter, ratio, progress) if modules == "ffn+attn" else None
    timings["slice_s"] = time.perf_counter() - tick
    params_after = sum(p.numel() for p in lm.parameters())

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
    }
    with atomic_folder(out) as tmp:
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if trained_policy is not None:
            save_policy(trained_policy, tmp / POLICY_FILE, {"source_model": model, "ratio": str(ratio)})
        timings["save_s"] = time.perf_counter() - tick
        write_manifest(tmp, {**manifest, "timings_s": timings})
    return CompressResult(
        out=out,
        model_type=config.model_type,
        ffn_width=width,
        k=k,
        params_before=params_before,
        params_after=params_after,
        timings=timings,
        best_reward=train_info["best_reward"] if train_info else None,
    )
