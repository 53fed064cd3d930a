"""Where every compute op runs, decided in one place.

* The spectral reward: ``torch`` (pure PyTorch, any device) or ``triton`` (the kernels of
  :mod:`prunenet.kernels`, CUDA): :func:`resolve_reward_backend`.
* The complement route of the Gram matrices, ``W^T W - W[drop]^T W[drop]`` instead of
  ``W[keep]^T W[keep]``: :func:`use_complement`, one cost model per backend, also used by the memory plan.
* The native extension ``prunenet._C`` (the in-place slicing op ``torch.ops.prunenet.slice_ffn_``):
  :mod:`prunenet._ext` loads it; :func:`prunenet.slicing.slice_ffn_` dispatches to it or to its
  pure-PyTorch reference.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

log = logging.getLogger(__name__)

REWARD_BACKENDS = ("auto", "torch", "triton")


class RewardBackendError(ValueError):
    """The requested reward backend cannot run here (a ``ValueError``: the CLI reports it in one line)."""


def triton_available() -> bool:
    """Whether the ``triton`` package is importable (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def resolve_reward_backend(backend: str, device: torch.device | str) -> str:
    """``"torch"`` or ``"triton"`` for states on ``device``.

    ``auto`` is ``triton`` on CUDA when triton is installed, ``torch`` elsewhere. An explicit
    ``triton`` that cannot run raises :class:`RewardBackendError` saying why; on CPU it runs only
    in Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
    """
    if backend not in REWARD_BACKENDS:
        raise ValueError(f"unknown reward backend {backend!r}; choose one of {', '.join(REWARD_BACKENDS)}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type == "cuda" and not triton_available():
            log.info("reward backend: torch (the triton package is not installed)")
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RewardBackendError(
            "--reward-backend triton needs the triton package (pip install triton; torch 2.13 pairs with "
            "triton 3.7.1); use --reward-backend torch or auto"
        )
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RewardBackendError(
            f"--reward-backend triton runs on CUDA devices, but the model is on {device}; "
            "use --reward-backend torch or auto"
        )
    return "triton"


def use_complement(n: int, k: int, backend: str = "torch") -> bool:
    """Form ``W^T W - W[drop]^T W[drop]`` (``n - k`` rows) rather than ``W[keep]^T W[keep]`` (``k`` rows)?

    Both routes make one pass over the rows they use (``2 d^2`` flops and ``d`` loads per row); the
    complement also needs the fixed ``W^T W`` of the whole layer.

    * ``torch``: measured on CPU (2 cores, SmolLM2 shape 30 x 1536 x 576, gather + matmul per layer):
      the complement takes 1.0x the time of the direct route at k/n = 0.5, 0.7x at 0.55, 0.45x at 0.7
      and 0.12x at 0.9 (1.5x slower at 0.4): the crossover is where the row counts are equal.
    * ``triton``: the fused kernel reads the float32 ``d x d`` base once per output tile, worth
      ``BLOCK_D / 2`` rows of 16-bit weights in bytes, i.e. at most 32 rows with 64-wide tiles, and no
      flops: it wins from ``n - k + 32 < k``. This crossover is reasoned from the kernel's traffic, not
      measured on a GPU; it agrees with the CPU measurement (0.51 for ``n = 1536``).
    """
    if k >= n:
        return False
    if backend == "triton":
        return n - k + 32 < k
    return 2 * k > n


def complement_rows(keeps: torch.Tensor, n: int) -> torch.Tensor:
    """The rows not kept: ``(L, k)`` distinct indices in ``[0, n)`` -> ``(L, n - k)`` int64, ascending."""
    num, k = keeps.shape
    dropped = torch.ones(num, n, dtype=torch.bool, device=keeps.device)
    dropped.scatter_(1, keeps.long(), False)
    if int(dropped.sum()) != num * (n - k):
        raise ValueError("kept row indices must be distinct within each layer")
    return dropped.nonzero()[:, 1].view(num, n - k)
