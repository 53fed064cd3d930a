"""Optional native extension ``prunenet._C`` and the pure-PyTorch fallbacks of its ops.

``prunenet._C`` is built by CMake from ``csrc/`` at install time (``pip install --no-build-isolation .``;
``PRUNENET_SKIP_EXT=1`` installs without it). Importing it registers the ops ``torch.ops.prunenet.*``.
At run time ``PRUNENET_DISABLE_EXT=1`` makes the package ignore a built extension (every op then takes
its pure-PyTorch path). Importing this module never fails: without the extension everything runs in
pure PyTorch, and only :func:`require` raises.

Ops (native op, pure-PyTorch reference, public wrapper that picks one):

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
