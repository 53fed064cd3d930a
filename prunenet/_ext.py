"""Optional native extension ``prunenet._C`` and the pure-PyTorch fallbacks of its ops.

``prunenet._C`` is built by CMake from ``csrc/`` at install time (``pip install --no-build-isolation .``;
``PRUNENET_SKIP_EXT=1`` installs without it). Importing it registers the ops ``torch.ops.prunenet.*``.
At run time ``PRUNENET_DISABLE_EXT=1`` makes the package ignore a built extension (every op then takes
its pure-PyTorch path). Importing this module never fails: without the extension everything runs in
pure PyTorch, and only :func:`require` raises.

Ops (native op, pure-PyTorch reference, public wrapper that picks one):

* ``torch.ops.prunenet.gather_rows`` / :func:`gather_rows_ref` / :func:`gather_rows`: rows copied into
  a new tensor (out of place; for reading kept rows from a checkpoint).
* ``torch.ops.prunenet.slice_ffn_`` / :func:`prunenet.slicing.slice_ffn_ref` /
  :func:`prunenet.slicing.slice_ffn_`: one FFN's tensors sliced in place.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

__all__ = [
    "available",
    "cuda_available",
    "gather_rows",
    "gather_rows_ref",
    "import_error",
    "load",
    "NATIVE_DTYPES",
    "native_device",
    "require",
]

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


# ---------------------------------------------------------------------------------------------- gather_rows


def gather_rows_ref(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reference for ``gather_rows``: ``src.index_select(0, index).contiguous()``.

    Args:
        src: ``(R,)`` or ``(R, C)``, any dtype and strides.
        index: ``(N,)`` integer row numbers in ``[0, R)``, on ``src``'s device.

    Returns:
        ``(N,)`` or ``(N, C)``, contiguous: ``out[i] = src[index[i]]``.
    """
    return src.index_select(0, index).contiguous()


def _gather_rows_native_ok(src: torch.Tensor, index: torch.Tensor) -> bool:
    """Whether ``torch.ops.prunenet.gather_rows`` can take these inputs (else the reference does)."""
    return (
        available()
        and native_device(src.device)
        and src.dtype in NATIVE_DTYPES
        and src.dim() in (1, 2)
        and (src.dim() == 1 or src.size(1) <= 1 or src.stride(1) == 1)
        and index.dtype == torch.int64
        and index.dim() == 1
        and index.device == src.device
        and not (src.requires_grad and torch.is_grad_enabled())  # the native op has no backward
    )


def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Copy the rows ``src[index]`` into a new contiguous tensor.

    Uses the native op ``torch.ops.prunenet.gather_rows`` when the extension is built, the device is
    supported (CPU; CUDA if built with CUDA) and the inputs fit it (float32/float16/bfloat16 ``src``,
    1-D or 2-D with a contiguous last dim, int64 1-D ``index``, no autograd); otherwise
    :func:`gather_rows_ref`. Both give bit-identical results.

    Args:
        src: ``(R,)`` or ``(R, C)``; rows may be strided (e.g. a column slice ``big[:, a:b]``).
        index: ``(N,)`` row numbers in ``[0, R)`` on ``src``'s device; repeats allowed.

    Returns:
        ``(N,)`` or ``(N, C)``, contiguous, ``src``'s dtype and device: ``out[i] = src[index[i]]``.

    Raises:
        RuntimeError / IndexError: an index outside ``[0, R)``.
    """
    if _gather_rows_native_ok(src, index):
        return torch.ops.prunenet.gather_rows.default(src, index)
    return gather_rows_ref(src, index)
