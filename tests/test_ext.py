"""The native extension prunenet._C (torch.ops.prunenet.gather_rows) against its pure-PyTorch reference.

Tests of the native op skip when the extension is not built (PRUNENET_SKIP_EXT=1); the fallback and
import tests always run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from prunenet import _ext

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"prunenet._C not built: {_ext.import_error()}")
needs_cuda_ext = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.cuda_available()),
    reason="needs a CUDA device and prunenet._C built with CUDA",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (src shape, number of gathered rows)
SHAPES = [((123, 431), 57), ((4128, 7), 5000), ((1001,), 777), ((64, 1), 9), ((5, 0), 3)]


def _op(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.ops.prunenet.gather_rows(src, index)


def _inputs(shape, n, dtype, device="cpu"):
    src = torch.randn(shape, device=device).to(dtype)
    index = torch.randint(0, shape[0], (n,), device=device)  # with repeats
    return src, index


def _check(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = _op(src, index)
    ref = _ext.gather_rows_ref(src, index)
    assert out.shape == (index.numel(), *src.shape[1:])
    assert out.dtype == src.dtype and out.device == src.device
    assert out.is_contiguous()
    assert torch.equal(out, ref)  # a copy: exact
    return out


# --------------------------------------------------------------------------- always run


def test_import_never_raises_without_extension():
    code = (
        "import sys; sys.modules['prunenet._C'] = None\n"  # makes `import prunenet._C` raise ImportError
        "import torch; from prunenet import _ext\n"
        "assert not _ext.available() and not _ext.cuda_available()\n"
        "assert 'prunenet._C' in _ext.import_error()\n"
        "try:\n    _ext.require()\nexcept RuntimeError as e:\n    assert 'pip install --no-build-isolation' in str(e)\n"
        "else:\n    raise AssertionError('require() did not raise')\n"
        "x = torch.randn(6, 4); i = torch.tensor([5, 0, 5])\n"
        "assert torch.equal(_ext.gather_rows(x, i), x[i])\n"
    )
    # Without PRUNENET_DISABLE_EXT (make test's second pass sets it): this test is about a failing import.
    env = {key: value for key, value in os.environ.items() if key != "PRUNENET_DISABLE_EXT"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


def test_gather_rows_falls_back_when_extension_unavailable(monkeypatch):
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_import_error", "ImportError: forced by the test")
    assert not _ext.available() and not _ext.cuda_available()
    with pytest.raises(RuntimeError, match="forced by the test"):
        _ext.require()
    src, index = _inputs((37, 11), 20, torch.float32)
    assert not _ext._gather_rows_native_ok(src, index)

    def boom(*args):
        raise AssertionError("native op called although the extension is unavailable")

    monkeypatch.setattr(torch.ops.prunenet, "gather_rows", SimpleNamespace(default=boom), raising=False)
    out = _ext.gather_rows(src, index)
    assert torch.equal(out, src[index]) and out.is_contiguous()


def test_gather_rows_ref_semantics():
    src = torch.arange(20.0).view(5, 4)[:, 1:3]
    out = _ext.gather_rows_ref(src, torch.tensor([4, 0, 4]))
    assert out.is_contiguous()
    assert out.tolist() == [[17.0, 18.0], [1.0, 2.0], [17.0, 18.0]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_wrapper_uses_reference_for_inputs_the_op_does_not_take(dtype):
    src = torch.arange(30).view(10, 3).to(dtype)
    index = torch.tensor([9, 1], dtype=torch.int32)  # int32 index: reference only
    assert not _ext._gather_rows_native_ok(src, index)
    assert torch.equal(_ext.gather_rows(src, index), src[index.long()])


def test_wrapper_keeps_autograd():
    src = torch.randn(8, 3, requires_grad=True)
    index = torch.tensor([1, 1, 7])
    assert not _ext._gather_rows_native_ok(src, index)
    _ext.gather_rows(src, index).sum().backward()
    assert src.grad[1].tolist() == [2.0, 2.0, 2.0] and src.grad[0].abs().sum() == 0


# --------------------------------------------------------------------------- native op, CPU


@needs_ext
def test_extension_module():
    module = _ext.require()
    assert isinstance(module.cuda_built(), bool)
    if torch.version.cuda is None:
        assert not module.cuda_built()
    assert module.torch_version().split(".")[:2] == torch.__version__.split(".")[:2]
    assert hasattr(torch.ops.prunenet, "gather_rows")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "n"), SHAPES, ids=str)
def test_gather_rows_matches_reference(shape, n, dtype):
    _check(*_inputs(shape, n, dtype))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_rows_row_strided_src(dtype):
    big = torch.randn(300, 500).to(dtype)
    src = big[:, 3:434]  # a column slice: row stride 500, last dim contiguous
    assert not src.is_contiguous() and src.stride() == (500, 1)
    index = torch.randint(0, 300, (211,))
    _check(src, index)
    _check(big[10:250:3, 7:9], torch.randint(0, 80, (50,)))  # strided rows and an offset
    _check(big[:, 0], torch.randint(0, 300, (99,)))  # 1-D with stride 500
    _check(src, index[::2])  # non-contiguous index
    _check(big.t()[:, :1], torch.randint(0, 500, (13,)))  # width 1: its stride does not matter


@needs_ext
def test_gather_rows_wrapper_uses_native_op():
    src, index = _inputs((40, 9), 30, torch.bfloat16)
    assert _ext._gather_rows_native_ok(src, index)
    assert torch.equal(_ext.gather_rows(src, index), src[index])


@needs_ext
@pytest.mark.parametrize("src_shape", [(123, 431), (1001,), (0, 5)], ids=str)
def test_gather_rows_empty_index(src_shape):
    src = torch.randn(src_shape)
    out = _check(src, torch.empty(0, dtype=torch.int64))
    assert out.shape == (0, *src_shape[1:])


@needs_ext
@pytest.mark.parametrize(
    ("index", "match"),
    [
        (torch.tensor([0, 10]), r"index\[1\] = 10 is out of range for src with 10 rows"),
        (torch.tensor([3, -1, 2]), r"index\[1\] = -1 is out of range"),
        (torch.tensor([1, 2], dtype=torch.int32), "index must be int64"),
        (torch.tensor([[1, 2]]), "index must be 1-D"),
    ],
    ids=["too-large", "negative", "int32", "2-D"],
)
def test_gather_rows_bad_index(index, match):
    with pytest.raises(RuntimeError, match=match):
        _op(torch.randn(10, 4), index)


@needs_ext
@pytest.mark.parametrize(
    ("src", "match"),
    [
        (torch.randn(10, 4, dtype=torch.float64), "src dtype must be float32, float16 or bfloat16"),
        (torch.randn(10, 4, 2), "src must be 1-D or 2-D"),
        (torch.randn(4, 10).t(), r"last dim of src must be contiguous"),
    ],
    ids=["float64", "3-D", "transposed"],
)
def test_gather_rows_bad_src(src, match):
    with pytest.raises(RuntimeError, match=match):
        _op(src, torch.tensor([0, 1]))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_rows_opcheck(dtype):
    big = torch.randn(50, 40).to(dtype)
    for src, index in [
        (big, torch.randint(0, 50, (17,))),
        (big[:, 5:31], torch.randint(0, 50, (8,))),
        (big[:, 0].contiguous(), torch.randint(0, 50, (23,))),
        (big, torch.empty(0, dtype=torch.int64)),
    ]:
        torch.library.opcheck(torch.ops.prunenet.gather_rows.default, (src, index))


# --------------------------------------------------------------------------- native op, CUDA


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "n"), SHAPES, ids=str)
def test_gather_rows_cuda_matches_reference(shape, n, dtype):
    _check(*_inputs(shape, n, dtype, device="cuda"))


@pytest.mark.gpu
@needs_cuda_ext
def test_gather_rows_cuda_strided_empty_and_wrapper():
    big = torch.randn(300, 500, device="cuda", dtype=torch.float16)
    _check(big[:, 3:434], torch.randint(0, 300, (211,), device="cuda"))
    _check(big[:, 0], torch.randint(0, 300, (99,), device="cuda"))
    _check(big, torch.empty(0, dtype=torch.int64, device="cuda"))
    index = torch.randint(0, 300, (40,), device="cuda")
    assert _ext._gather_rows_native_ok(big, index)
    assert torch.equal(_ext.gather_rows(big, index), big[index])


@pytest.mark.gpu
@needs_cuda_ext
def test_gather_rows_cuda_errors():
    src = torch.randn(10, 4, device="cuda")
    with pytest.raises(RuntimeError, match=r"index\[2\] = 10 is out of range"):
        _op(src, torch.tensor([0, 1, 10], device="cuda"))
    with pytest.raises(RuntimeError, match=r"index\[0\] = -3 is out of range"):
        _op(src, torch.tensor([-3, 1], device="cuda"))
    with pytest.raises(RuntimeError, match="same device"):
        _op(src, torch.tensor([0, 1]))
    torch.cuda.synchronize()  # the context is still usable
    _check(src, torch.tensor([9, 0], device="cuda"))


@pytest.mark.gpu
@needs_cuda_ext
def test_gather_rows_cuda_opcheck():
    big = torch.randn(50, 40, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(
        torch.ops.prunenet.gather_rows.default, (big[:, 5:31], torch.randint(0, 50, (8,), device="cuda"))
    )
