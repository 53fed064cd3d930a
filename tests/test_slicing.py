"""Fused in-place FFN slicing (torch.ops.prunenet.slice_ffn_) against the out-of-place reference.

The reference is ``index_select`` (``slice_ffn_ref``); the native op must give bit-identical tensors,
in the same storage, on odd shapes, every dtype, grouped (fused) and row-strided inputs, and scratch
buffers small enough to force every kind of run in the planner. Tests of the native op skip when the
extension is not built; the PyTorch-path tests always run.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch
from native_check import check_native

from prunenet import ops
from prunenet.slicing import slice_ffn_, slice_ffn_ref

needs_ext = pytest.mark.skipif(not ops.available(), reason=f"prunenet._C not built: {ops.import_error()}")
needs_cuda_ext = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.cuda_available()), reason="needs a CUDA device and the CUDA extension"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _op(rows, cols, keep, width, scratch_bytes=4 << 20):
    torch.ops.prunenet.slice_ffn_(rows, cols, keep, width, scratch_bytes)


def _keep(n: int, k: int, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values.to(device)


def _ffn(n, d, dtype, groups=1, bias=True, device="cpu", seed=0):
    """(rows, cols) of a gated or fused FFN: in-projection (g*n, d) + bias (g*n,), out-projection (d, n)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(groups * n, d, generator=g).to(device, dtype)]
    if bias:
        rows.append(torch.randn(groups * n, generator=g).to(device, dtype))
    cols = [torch.randn(d, n, generator=g).to(device, dtype)]
    return rows, cols


# Not contiguous=True: the op slices row-strided views in place and keeps their strides.
_check_native = functools.partial(check_native, _op, slice_ffn_ref)


# ------------------------------------------------------------------------------------------- native, CPU


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1536, 576), (431, 123), (123, 431), (7, 1)])
@pytest.mark.parametrize("which", ["one", "all", "random"])
def test_native_matches_reference(n, d, dtype, which):
    k = {"one": 1, "all": n, "random": max(1, (7 * n) // 10)}[which]
    keep = _keep(n, k) if which != "one" else torch.tensor([n // 2])
    rows, cols = _ffn(n, d, dtype, groups=1)
    rows.insert(1, torch.randn(n, d).to(dtype))  # a gated FFN: gate, up (and a bias)
    _check_native(rows, cols, keep, n)


@needs_ext
@pytest.mark.parametrize("scratch_bytes", [0, 100, 5000, 1 << 20])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_native_fuzz_small_scratch(scratch_bytes, groups):
    """Random shapes and kept sets with scratch buffers from one unit up: staged, local and direct runs."""
    gen = torch.Generator().manual_seed(scratch_bytes + groups)
    for trial in range(40):
        n, d = (int(torch.randint(1, hi, (), generator=gen)) for hi in (90, 40))
        k = int(torch.randint(1, n + 1, (), generator=gen))
        keep = torch.randperm(n, generator=gen)[:k].sort().values
        rows, cols = _ffn(n, d, DTYPES[trial % 3], groups=groups, seed=trial)
        cols.append(torch.randn(d, groups * n, generator=gen).to(DTYPES[trial % 3]))  # fused out-projection
        _check_native(rows, cols, keep, n, scratch_bytes)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scratch_bytes", [64, 4 << 20])
def test_native_row_strided_views_touch_only_their_elements(dtype, scratch_bytes):
    n, d, k = 97, 33, 60
    keep = _keep(n, k, seed=3)
    big_rows = torch.randn(2 * n + 5, d + 7).to(dtype)
    big_cols = torch.randn(d + 4, 2 * n + 9).to(dtype)
    rows = [big_rows[3 : 3 + 2 * n, 2 : 2 + d], torch.randn(3 * n).to(dtype)[::3]]  # row-strided; strided 1-D
    cols = [big_cols[1 : 1 + d, 5 : 5 + 2 * n]]
    assert not any(t.is_contiguous() for t in rows + cols)
    before_rows, before_cols = big_rows.clone(), big_cols.clone()
    _check_native(rows, cols, keep, n, scratch_bytes)
    assert rows[0].stride() == (d + 7, 1) and cols[0].stride() == (2 * n + 9, 1)  # strides kept
    outside_rows = torch.ones_like(big_rows, dtype=torch.bool)
    outside_rows[3 : 3 + 2 * n, 2 : 2 + d] = False
    outside_cols = torch.ones_like(big_cols, dtype=torch.bool)
    outside_cols[1 : 1 + d, 5 : 5 + 2 * n] = False
    assert torch.equal(big_rows[outside_rows], before_rows[outside_rows])
    assert torch.equal(big_cols[outside_cols], before_cols[outside_cols])


@needs_ext
def test_native_llama_7b_shape_once():
    n, d = 11008, 4096
    keep = _keep(n, 7706, seed=7)
    rows, cols = _ffn(n, d, torch.float16, bias=False)
    _check_native(rows, cols, keep, n)


@needs_ext
def test_native_gives_the_tail_back_on_cpu():
    n, d = 4096, 256
    keep = _keep(n, 1000)
    rows, cols = _ffn(n, d, torch.float32)
    _op(rows, cols, keep, n)
    assert rows[0].untyped_storage().nbytes() == 1000 * d * 4
    assert cols[0].untyped_storage().nbytes() == d * 1000 * 4
    big = torch.randn(2 * n, d)
    view = big[:n]  # contiguous, but not the whole storage: nothing is given back
    _op([view], [], keep, n)
    assert big.untyped_storage().nbytes() == 2 * n * d * 4 and view.shape == (1000, d)


@needs_ext
def test_native_slices_parameters_in_place():
    lin = torch.nn.Linear(5, 12)
    keep = torch.tensor([1, 4, 11])
    expected = lin.weight.detach()[keep].clone(), lin.bias.detach()[keep].clone()
    with torch.no_grad():
        _op([lin.weight, lin.bias], [], keep, 12)
    assert isinstance(lin.weight, torch.nn.Parameter) and lin.weight.requires_grad
    assert torch.equal(lin.weight, expected[0]) and torch.equal(lin.bias, expected[1])


@needs_ext
def test_opcheck():
    n, d = 37, 11
    keep = torch.tensor([0, 3, 4, 10, 36])
    for scratch in (0, 4 << 20):
        args = ([torch.randn(n, d), torch.randn(n)], [torch.randn(d, n)], keep, n, scratch)
        # Not test_aot_dispatch_dynamic: the op changes its inputs' shapes in place (like resize_), and its
        # Meta kernel works on concrete sizes only; slicing is never traced with symbolic shapes.
        torch.library.opcheck(
            torch.ops.prunenet.slice_ffn_.default,
            args,
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static"),
        )


def _bad_calls():
    n, d = 20, 6
    good = torch.tensor([1, 5, 7])
    yield "out of range", good.clone().index_fill_(0, torch.tensor([2]), 20), {}
    yield "out of range", torch.tensor([-1, 2, 3]), {}
    yield "sorted and unique", torch.tensor([1, 7, 5]), {}
    yield "sorted and unique", torch.tensor([1, 5, 5]), {}
    yield "between 1 and width", torch.tensor([], dtype=torch.long), {}
    yield "int64", good.int(), {}
    yield "1-D", good[None], {}
    yield "multiple of width", good, {"width": 7}
    yield "float32, float16 or bfloat16", good, {"dtype": torch.float64}
    yield "expected Float on cpu", good, {"mixed": True}
    yield "share memory", good, {"twice": True}
    yield "requires grad", good, {"grad": True}
    yield "must not overlap", good, {"expanded": True}
    del n, d


@needs_ext
@pytest.mark.parametrize("message,keep,case", list(_bad_calls()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_calls_are_rejected_and_change_nothing(message, keep, case):
    n, d = 20, 6
    dtype = case.get("dtype", torch.float32)
    rows = [torch.randn(n, d, dtype=dtype), torch.randn(n, dtype=dtype)]
    cols = [torch.randn(d, n, dtype=torch.float16 if case.get("mixed") else dtype)]
    if case.get("twice"):
        cols.append(cols[0])
    if case.get("detached"):
        rows[0] = rows[0].detach()
    if case.get("expanded"):
        rows.append(torch.randn(1, d).expand(n, d))
    if case.get("grad"):
        rows[0].requires_grad_()
    before = [t.detach().clone() for t in rows + cols]
    with pytest.raises(RuntimeError, match=message):
        _op(rows, cols, keep, case.get("width", n))
    for t, b in zip(rows + cols, before, strict=True):
        assert t.shape == b.shape and torch.equal(t.detach(), b)


# ------------------------------------------------------------------------------- wrapper and PyTorch path


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=needs_ext), "auto"])
def test_wrapper_backends_agree_with_reference(backend):
    n, d = 61, 17
    keep = _keep(n, 40)
    for dtype in DTYPES:
        rows, cols = _ffn(n, d, dtype, groups=2)
        exp_rows, exp_cols = slice_ffn_ref(rows, cols, keep, n)
        ids = [id(t) for t in rows + cols]
        got_rows, got_cols = slice_ffn_(rows, cols, keep, n, backend=backend)
        assert [id(t) for t in got_rows + got_cols] == ids  # the same objects, new shapes
        for got, exp in zip(got_rows + got_cols, exp_rows + exp_cols, strict=True):
            assert torch.equal(got, exp)


def test_wrapper_rejects_bad_input_on_torch_path():
    rows, cols = _ffn(10, 4, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        slice_ffn_(rows, cols, torch.tensor([1]), 10, backend="fast")
    with pytest.raises(ValueError, match="sorted, unique"):
        slice_ffn_(rows, cols, torch.tensor([3, 1]), 10, backend="torch")
    assert rows[0].shape == (10, 4)


def test_disable_ext_env_forces_the_pytorch_path():
    code = (
        "import torch; from prunenet import ops; from prunenet.slicing import slice_ffn_\n"
        "assert not ops.available() and 'PRUNENET_DISABLE_EXT' in ops.import_error()\n"
        "w = torch.randn(8, 3); k = torch.tensor([0, 5])\n"
        "assert not ops.native_slice_ok([w], [], k)\n"
        "slice_ffn_([w], [], k, 8); assert w.shape == (2, 3)\n"
    )
    env = {**__import__("os").environ, "PRUNENET_DISABLE_EXT": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scratch_bytes", [0, 4096, 4 << 20])
def test_cuda_matches_reference(dtype, scratch_bytes):
    for n, d, groups in [(1536, 576, 1), (431, 123, 2), (11008, 4096, 1), (7, 1, 3)]:
        keep = _keep(n, max(1, (7 * n) // 10), device="cuda")
        rows, cols = _ffn(n, d, dtype, groups=groups, device="cuda")
        big = torch.randn(2 * n * groups + 3, d + 5, device="cuda").to(dtype)
        rows.append(big[1 : 1 + groups * n, 2 : 2 + d])  # row-strided
        _check_native(rows, cols, keep, n, scratch_bytes)


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_bad_index_rejected_and_opcheck():
    rows, cols = _ffn(20, 6, torch.float32, device="cuda")
    before = [t.clone() for t in rows + cols]
    with pytest.raises(RuntimeError, match="out of range"):
        _op(rows, cols, torch.tensor([1, 20], device="cuda"), 20)
    assert all(torch.equal(t, b) for t, b in zip(rows + cols, before, strict=True))
    torch.library.opcheck(
        torch.ops.prunenet.slice_ffn_.default,
        (rows, cols, torch.tensor([1, 2, 19], device="cuda"), 20, 64),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static"),
    )
