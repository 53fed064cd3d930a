"""Micro-benchmarks (pytest-benchmark) of the two hot ops, for `make bench-micro` and `make bench-micro-compare`.

* ``test_slice_ffn``: :func:`prunenet.slicing.slice_ffn_` on one SmolLM2-135M-shaped FFN (n=1536, d=576; rows:
  gate_proj and up_proj ``(n, d)``, cols: down_proj ``(d, n)``), ratio 0.3 (``kept_width(0.3, n)`` sorted random
  neurons, fixed seed), fp32 and bf16, on the CPU: ``native`` (the fused in-place op; skipped without
  ``prunenet._C``) vs ``torch`` (each tensor replaced by its ``index_select`` copy). The op is in place, so every
  round slices fresh copies that an untimed setup makes.
* ``test_episode_reward``: :func:`prunenet.reward.episode_rewards`, one training episode on 4 layers of
  SmolLM2-135M-shaped state matrices (4 x 1536 x 576, fp32, ``floor(0.7 n)`` random rows kept per layer):
  ``torch`` on the CPU vs ``triton`` on CUDA (skipped without a GPU and triton). The once-per-training-run
  :func:`~prunenet.reward.prepare_reward` is not timed.

Each benchmark checks the result of its last timed round against the other path, so one that computes garbage
fails instead of reporting a time: slicing exactly against the other backend (the out-of-place reference
:func:`~prunenet.slicing.slice_ffn_ref` where the native op is missing); the torch reward against the original
per-layer method (``svdvals`` of ``W[keep]``), the Triton reward against the torch one. The rewards are
``1 / KS``; their KS statistics may differ by two places in the sorted order (float32 rounding can swap two
singular values that agree to ~1e-6), no more.

Benchmarks are grouped so both paths of one op sit side by side in the table; each records torch's thread count
(``extra_info``), which the make targets set to one (``MICRO_THREADS``). ``conftest.py`` holds the deliberate
slow-down (``PRUNENET_MICRO_SLOWDOWN``) that demonstrates a failing compare.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from prunenet import ops, reward
from prunenet.config import kept_width
from prunenet.slicing import slice_ffn_, slice_ffn_ref

N, D = 1536, 576  # SmolLM2-135M: FFN width, hidden size
RATIO = 0.3
LAYERS = 4  # reward states; an episode's time scales with the layer count (4: ~50 ms on 2 CPU cores)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Rounds: enough that a median is stable, few enough that the whole run takes seconds on one thread (a slicing
# round is about 1 ms plus its setup, a reward round about 50 ms).
SLICE_ROUNDS, REWARD_ROUNDS = 500, 40


def native_missing() -> str | None:
    """Why the native slicing op cannot run here, or None."""
    if not ops.available():
        return f"prunenet._C is not available ({ops.import_error()})"
    if not hasattr(torch.ops.prunenet, "slice_ffn_"):
        return "prunenet._C has no slice_ffn_ op (rebuild it: pip install --no-build-isolation -e .)"
    return None


@functools.cache
def ffn(dtype: str) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The FFN every round copies: rows ``[gate, up]``, cols ``[down]``, and the kept neurons."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(N, D, generator=g).to(DTYPES[dtype]) for _ in range(2)]
    cols = [torch.randn(D, N, generator=g).to(DTYPES[dtype])]
    keep = torch.randperm(N, generator=g)[: kept_width(RATIO, N)].sort().values
    return rows, cols, keep


def fresh_copies(dtype: str) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    rows, cols, keep = ffn(dtype)
    return [t.clone() for t in rows], [t.clone() for t in cols], keep


def sliced_by(backend: str, dtype: str) -> list[torch.Tensor]:
    """The sliced tensors (rows, then cols) through ``backend``; ``"ref"``: the out-of-place reference."""
    rows, cols, keep = fresh_copies(dtype)
    if backend == "ref":
        rows, cols = slice_ffn_ref(rows, cols, keep, N)
    else:
        rows, cols = slice_ffn_(rows, cols, keep, N, backend=backend)
    return rows + cols


@pytest.mark.parametrize(
    "dtype, backend",
    [("fp32", "native"), ("fp32", "torch"), ("bf16", "native"), ("bf16", "torch")],
    ids=["fp32-native", "fp32-torch", "bf16-native", "bf16-torch"],
)
def test_slice_ffn(benchmark, slowed, dtype, backend):
    if backend == "native" and native_missing():
        pytest.skip(native_missing())
    benchmark.group = f"slice_ffn {dtype}: SmolLM2-135M FFN (n={N}, d={D}), ratio {RATIO}, CPU"
    benchmark.extra_info["threads"] = torch.get_num_threads()

    def setup():  # untimed: the op works in place, so each round needs its own copies
        rows, cols, keep = fresh_copies(dtype)
        return (rows, cols, keep, N), {"backend": backend}

    rows, cols = benchmark.pedantic(slowed(slice_ffn_), setup=setup, rounds=SLICE_ROUNDS, warmup_rounds=3)

    other = "torch" if backend == "native" else ("ref" if native_missing() else "native")
    expected = sliced_by(other, dtype)
    got = rows + cols
    assert [t.shape for t in got] == [t.shape for t in expected]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), f"{backend} differs from {other}"


@functools.cache
def reward_inputs() -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """``LAYERS`` random state matrices ``(N, D)`` (fp32, CPU), each layer's kept rows, and ``k``."""
    g = torch.Generator().manual_seed(0)
    k = math.floor((1 - RATIO) * N)
    states = [torch.randn(N, D, generator=g) * 0.02 for _ in range(LAYERS)]
    keeps = [torch.randperm(N, generator=g)[:k].sort().values for _ in range(LAYERS)]
    return states, keeps, k


def svd_rewards(states: list[torch.Tensor], keeps: list[torch.Tensor]) -> torch.Tensor:
    """The original per-layer method: singular values of ``W`` and ``W[keep]`` by SVD, then the KS statistic."""
    full = torch.stack([reward.singular_values(w) for w in states])
    kept = torch.stack([reward.singular_values(w[keep]) for w, keep in zip(states, keeps, strict=True)])
    return reward.reward_from_ks(reward.ks_statistic(full, kept))


def torch_rewards(states: list[torch.Tensor], keeps: list[torch.Tensor], k: int) -> torch.Tensor:
    return reward.episode_rewards(states, keeps, reward.prepare_reward(states, k, "torch"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_episode_reward(benchmark, slowed, backend):
    if backend == "triton" and not (torch.cuda.is_available() and ops.triton_available()):
        pytest.skip("the Triton reward runs on CUDA: needs a GPU and the triton package")
    device = "cuda" if backend == "triton" else "cpu"
    benchmark.group = f"episode_rewards: {LAYERS} x {N} x {D} fp32, ratio {RATIO} (torch: CPU, triton: CUDA)"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    states, keeps, k = reward_inputs()
    on_device = [w.to(device) for w in states]
    keeps_on_device = [keep.to(device) for keep in keeps]
    prepared = reward.prepare_reward(on_device, k, backend)  # once per training run: not timed

    # episode_rewards returns a CPU tensor, so a CUDA round ends synchronised.
    rewards = benchmark.pedantic(
        slowed(reward.episode_rewards), args=(on_device, keeps_on_device, prepared), rounds=REWARD_ROUNDS,
        warmup_rounds=1,
    )  # fmt: skip

    expected = svd_rewards(states, keeps) if backend == "torch" else torch_rewards(states, keeps, k)
    assert rewards.shape == (LAYERS,) and bool(torch.isfinite(rewards).all())
    torch.testing.assert_close(1 / rewards, 1 / expected, rtol=0, atol=2 / min(k, D))
