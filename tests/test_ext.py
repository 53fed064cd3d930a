"""The native extension prunenet._C: loading, build facts and the pure-PyTorch fallback without it.

Its op ``torch.ops.prunenet.slice_ffn_`` is tested in tests/test_slicing.py. Tests of the built module
skip when the extension is not built (PRUNENET_SKIP_EXT=1); the fallback and import tests always run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from prunenet import _ext, slicing

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"prunenet._C not built: {_ext.import_error()}")


# --------------------------------------------------------------------------- always run


def test_import_never_raises_without_extension():
    code = (
        "import sys; sys.modules['prunenet._C'] = None\n"  # makes `import prunenet._C` raise ImportError
        "import torch; from prunenet import _ext\n"
        "assert not _ext.available() and not _ext.cuda_available()\n"
        "assert 'prunenet._C' in _ext.import_error()\n"
        "try:\n    _ext.require()\nexcept RuntimeError as e:\n    assert 'pip install --no-build-isolation' in str(e)\n"
        "else:\n    raise AssertionError('require() did not raise')\n"
        "from prunenet.slicing import slice_ffn_\n"
        "w = torch.randn(6, 4); k = torch.tensor([0, 5]); ref = w[k].clone()\n"
        "slice_ffn_([w], [], k, 6); assert torch.equal(w, ref)\n"
    )
    # Without PRUNENET_DISABLE_EXT (make test's second pass sets it): this test is about a failing import.
    env = {key: value for key, value in os.environ.items() if key != "PRUNENET_DISABLE_EXT"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


def test_falls_back_when_extension_unavailable(monkeypatch):
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_import_error", "ImportError: forced by the test")
    assert not _ext.available() and not _ext.cuda_available()
    with pytest.raises(RuntimeError, match="forced by the test"):
        _ext.require()
    w = torch.randn(37, 11)
    keep = torch.tensor([2, 20, 36])
    assert not slicing._native_ok([w], [], keep)

    def boom(*args):
        raise AssertionError("native op called although the extension is unavailable")

    monkeypatch.setattr(torch.ops.prunenet, "slice_ffn_", SimpleNamespace(default=boom), raising=False)
    ref = w[keep].clone()
    slicing.slice_ffn_([w], [], keep, 37)
    assert torch.equal(w, ref)


# --------------------------------------------------------------------------- built module


@needs_ext
def test_extension_module():
    module = _ext.require()
    assert isinstance(module.cuda_built(), bool)
    if torch.version.cuda is None:
        assert not module.cuda_built()
    assert module.torch_version().split(".")[:2] == torch.__version__.split(".")[:2]
    assert hasattr(torch.ops.prunenet, "slice_ffn_")
