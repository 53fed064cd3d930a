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

from prunenet import ops, slicing

needs_ext = pytest.mark.skipif(not ops.available(), reason=f"prunenet._C not built: {ops.import_error()}")


# --------------------------------------------------------------------------- always run


def test_import_never_raises_without_extension():
    code = (
        "import sys; sys.modules['prunenet._C'] = None\n"  # makes `import prunenet._C` raise ImportError
        "import torch; from prunenet import ops\n"
        "assert not ops.available() and not ops.cuda_available()\n"
        "assert 'prunenet._C' in ops.import_error()\n"
        "try:\n    ops.require()\nexcept RuntimeError as e:\n    assert 'pip install --no-build-isolation' in str(e)\n"
        "else:\n    raise AssertionError('require() did not raise')\n"
        "from prunenet.slicing import slice_ffn_\n"
        "w = torch.randn(6, 4); k = torch.tensor([0, 5]); ref = w[k].clone()\n"
        "slice_ffn_([w], [], k, 6); assert torch.equal(w, ref)\n"
    )
    # Without PRUNENET_DISABLE_EXT (make test's second pass sets it): this test is about a failing import.
    env = {key: value for key, value in os.environ.items() if key != "PRUNENET_DISABLE_EXT"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


def test_falls_back_when_extension_unavailable(monkeypatch):
    monkeypatch.setattr(ops, "_module", None)
    monkeypatch.setattr(ops, "_import_error", "ImportError: forced by the test")
    assert not ops.available() and not ops.cuda_available()
    with pytest.raises(RuntimeError, match="forced by the test"):
        ops.require()
    w = torch.randn(37, 11)
    keep = torch.tensor([2, 20, 36])
    assert not ops.native_slice_ok([w], [], keep)

    def boom(*args):
        raise AssertionError("native op called although the extension is unavailable")

    monkeypatch.setattr(torch.ops.prunenet, "slice_ffn_", SimpleNamespace(default=boom), raising=False)
    ref = w[keep].clone()
    slicing.slice_ffn_([w], [], keep, 37)
    assert torch.equal(w, ref)


# --------------------------------------------------------------------------- built module


@needs_ext
def test_extension_module():
    module = ops.require()
    assert isinstance(module.cuda_built(), bool)
    if torch.version.cuda is None:
        assert not module.cuda_built()
    assert module.torch_version().split(".")[:2] == torch.__version__.split(".")[:2]
    assert hasattr(torch.ops.prunenet, "slice_ffn_")
