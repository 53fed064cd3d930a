"""Where every compute op runs, decided in one place.

* The spectral reward: ``torch`` (pure PyTorch, any device) or ``triton`` (the kernels of
  :mod:`prunenet.kernels`, CUDA): :func:`resolve_reward_backend`.
* Which Gram matrix the reward uses (:func:`gram_side`: ``W^T W``, or ``W W^T`` for states with fewer
  rows than columns) and, for ``W^T W``, the complement route ``W^T W - W[drop]^T W[drop]`` instead of
  ``W[keep]^T W[keep]``: :func:`use_complement`, one cost model per backend; :func:`keeps_full_grams`
  combines them for the reward and the memory plan.
* The native extension ``prunenet._C``, built by CMake from ``csrc/`` at install time
  (``pip install --no-build-isolation .``; ``PRUNENET_SKIP_EXT=1`` installs without it): importing it
  registers ``torch.ops.prunenet.slice_ffn_``, the in-place slicing op, and ``slice_experts_``, the same
  for fused mixture-of-experts tensors. :func:`native_slice_ok` / :func:`native_experts_ok` say when
  :func:`prunenet.slicing.slice_ffn_` / :func:`~prunenet.slicing.slice_experts_` may call them; otherwise
  their pure-PyTorch references run. At run time ``PRUNENET_DISABLE_EXT=1`` makes the package ignore a
  built extension. Nothing fails at import:
  only :func:`require` raises, with how to rebuild.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Sequence
from types import ModuleType

import torch

from .config import REWARD_BACKENDS

log = logging.getLogger(__name__)


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


def gram_side(n: int, d: int) -> str:
    """Which Gram matrix of a state ``W`` ``(n, d)`` the reward eigen-solves: the smaller one.

    * ``"cols"`` (``n > d``, every dense FFN: ``n`` is a multiple of ``d``): ``W[keep]^T W[keep]``, ``d x d``.
    * ``"rows"`` (``n <= d``, typical of experts: Qwen3-30B-A3B's are ``768 x 2048``): ``W[keep] W[keep]^T``,
      ``k x k``, which is the ``(keep, keep)`` principal submatrix of the run's ``W W^T``: an episode
      then gathers it instead of multiplying. Measured on that shape (32 experts, ratio 0.3, 2 CPU cores,
      ``benchmarks/bench_reward.py --shapes qwen3-30b-a3b-experts --layers 32``, side by side): an episode
      in 375 ms against 6583 ms on the ``d x d`` route (17.6x), the set-up in 1.1 s against 6.8 s, and
      ``W W^T`` holds 2.4 MB per expert where ``W^T W`` held 16.8 MB; the rewards are identical.

    Both have the same non-zero eigenvalues, the squared singular values.
    """
    return "rows" if n <= d else "cols"


def keeps_full_grams(n: int, d: int, k: int | None, backend: str = "torch") -> bool:
    """Whether a training run keeps every layer's full Gram matrix (``W W^T`` or ``W^T W``, see
    :func:`gram_side`): always on the rows side (episodes gather from it), where the complement route
    pays on the columns side (:func:`use_complement`); never when ``k`` is unknown."""
    if k is None:
        return False
    return gram_side(n, d) == "rows" or use_complement(n, k, backend)


def complement_rows(keeps: torch.Tensor, n: int) -> torch.Tensor:
    """The rows not kept: ``(L, k)`` distinct indices in ``[0, n)`` -> ``(L, n - k)`` int64, ascending."""
    num, k = keeps.shape
    dropped = torch.ones(num, n, dtype=torch.bool, device=keeps.device)
    dropped.scatter_(1, keeps.long(), False)
    if int(dropped.sum()) != num * (n - k):
        raise ValueError("kept row indices must be distinct within each layer")
    return dropped.nonzero()[:, 1].view(num, n - k)


# -- the native extension ---------------------------------------------------------------------------

_NOT_TRIED = object()
_module: object = _NOT_TRIED  # ModuleType | None once load() has run
_import_error: str | None = None

NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def load() -> ModuleType | None:
    """Import ``prunenet._C`` once (cached) and return it, or None if that fails (see :func:`import_error`)."""
    global _module, _import_error
    if _module is _NOT_TRIED and os.environ.get("PRUNENET_DISABLE_EXT") == "1":
        _module, _import_error = None, "disabled by PRUNENET_DISABLE_EXT=1"
    if _module is _NOT_TRIED:
        try:
            module = importlib.import_module("prunenet._C")
            built = module.torch_version().split("+")[0].split(".")[:2]
            running = torch.__version__.split("+")[0].split(".")[:2]
            if module.torch_version() != "unknown" and built != running:  # "unknown": built by hand with CMake
                raise ImportError(
                    f"prunenet._C was built against torch {module.torch_version()}, "
                    f"but torch {torch.__version__} is installed"
                )
        except Exception as e:  # ImportError, undefined symbols (ImportError/OSError), a broken build
            _module, _import_error = None, f"{type(e).__name__}: {e}"
        else:
            _module, _import_error = module, None
    return _module  # type: ignore[return-value]


def available() -> bool:
    """True if the native extension is importable (its CPU kernels are then registered)."""
    return load() is not None


def cuda_available() -> bool:
    """True if the native extension was built with its CUDA kernels (says nothing about a GPU being present)."""
    module = load()
    return module is not None and bool(module.cuda_built())


def import_error() -> str | None:
    """Why ``import prunenet._C`` failed, or None (not tried yet, or it worked)."""
    load()
    return _import_error


def require() -> ModuleType:
    """Return ``prunenet._C``, or raise RuntimeError saying how to build it."""
    module = load()
    if module is None:
        raise RuntimeError(
            "the native extension prunenet._C is not built: reinstall with `pip install --no-build-isolation .` "
            "(needs cmake and a C++17 compiler; PRUNENET_SKIP_EXT=1 builds without it); "
            f"import failed with: {_import_error}"
        )
    return module


def native_device(device: torch.device) -> bool:
    """Whether the native ops have a kernel for ``device`` (CPU always; CUDA if built with it)."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and cuda_available()


def _layout_ok(t: torch.Tensor, dim: int) -> bool:
    """Whether the native op takes this layout: contiguous, or row-strided (see ``check_layout`` in csrc)."""
    if dim == 0:
        if t.dim() == 2 and t.shape[1] > 1:
            return t.stride(1) == 1 and t.stride(0) >= t.shape[1]
        return t.dim() in (1, 2) and t.stride(0) >= 1
    return t.dim() == 2 and t.stride(1) >= 1 and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1] * t.stride(1))


def _native_op_takes(op: str, tensors: Sequence[torch.Tensor], keep: torch.Tensor) -> bool:
    """What both slicing ops ask of their inputs: the op built, a native device, one float dtype, int64 keep."""
    if not (available() and hasattr(torch.ops.prunenet, op)):
        return False
    first = tensors[0]
    return (
        native_device(first.device)
        and first.dtype in NATIVE_DTYPES
        and all(t.dtype == first.dtype and t.device == first.device for t in tensors)
        and keep.dtype == torch.int64
    )


def native_experts_ok(rows: Sequence[torch.Tensor], cols: Sequence[torch.Tensor], keep: torch.Tensor) -> bool:
    """Whether ``torch.ops.prunenet.slice_experts_`` can take these inputs (else the PyTorch path does)."""
    tensors = [*rows, *cols]
    return _native_op_takes("slice_experts_", tensors, keep) and all(t.is_contiguous() for t in tensors)


def native_slice_ok(rows: Sequence[torch.Tensor], cols: Sequence[torch.Tensor], keep: torch.Tensor) -> bool:
    """Whether ``torch.ops.prunenet.slice_ffn_`` can take these inputs (else the PyTorch path does)."""
    return (
        _native_op_takes("slice_ffn_", [*rows, *cols], keep)
        and all(_layout_ok(t, 0) for t in rows)
        and all(_layout_ok(t, 1) for t in cols)
    )
