"""Fused expert slicing (torch.ops.prunenet.slice_experts_) against the out-of-place reference.

A mixture-of-experts block stores its experts as ``(E, g*n, d)`` in-projections, ``(E, g*n)`` biases and
``(E, d, n)`` out-projections, and every expert keeps its own ``k`` neurons (``keep`` is ``(E, k)``). The
reference (``slice_experts_ref``) gathers each expert's entries with ``take_along_dim``; independently of
it, expert ``e`` of the result must equal the dense slicing reference ``slice_ffn_ref`` applied to expert
``e`` alone. The native op must give bit-identical tensors in the same storage, for every dtype, odd
shapes, fused groups and scratch buffers from nothing up.
"""

from __future__ import annotations

import functools

import pytest
import torch
from native_check import check_native

from prunenet import ops
from prunenet.slicing import slice_experts_, slice_experts_ref, slice_ffn_ref

needs_ext = pytest.mark.skipif(not ops.available(), reason=f"prunenet._C not built: {ops.import_error()}")
needs_cuda_ext = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.cuda_available()), reason="needs a CUDA device and the CUDA extension"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _keeps(experts: int, n: int, k: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """``(E, k)``: a different random kept set per expert."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(experts)]).to(device)


def _experts(experts, n, d, dtype, groups=2, device="cpu", seed=0):
    """(rows, cols) of a fused MoE block: gate_up (E, g*n, d) and its bias (E, g*n), down (E, d, n)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(experts, groups * n, d, generator=g), torch.randn(experts, groups * n, generator=g)]
    cols = [torch.randn(experts, d, n, generator=g)]
    return [t.to(device, dtype) for t in rows], [t.to(device, dtype) for t in cols]


def _op(rows, cols, keep, width, scratch_bytes):
    torch.ops.prunenet.slice_experts_(rows, cols, keep, width, scratch_bytes)


# The op takes only contiguous inputs: its results are contiguous too.
_check_native = functools.partial(check_native, _op, slice_experts_ref, contiguous=True)


def test_reference_is_the_dense_reference_per_expert():
    rows, cols = _experts(5, 23, 7, torch.float32, groups=2)
    keep = _keeps(5, 23, 9)
    got_rows, got_cols = slice_experts_ref(rows, cols, keep, 23)
    for e in range(5):
        exp_rows, exp_cols = slice_ffn_ref([t[e] for t in rows], [t[e] for t in cols], keep[e], 23)
        for got, exp in zip([t[e] for t in got_rows + got_cols], exp_rows + exp_cols, strict=True):
            assert torch.equal(got, exp)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("experts,n,d,groups", [(8, 96, 40, 2), (3, 431, 123, 1), (5, 7, 1, 3), (1, 37, 11, 2)])
@pytest.mark.parametrize("which", ["one", "all", "random"])
def test_native_matches_reference(experts, n, d, groups, dtype, which):
    k = {"one": 1, "all": n, "random": max(1, (7 * n) // 10)}[which]
    rows, cols = _experts(experts, n, d, dtype, groups)
    _check_native(rows, cols, _keeps(experts, n, k), n)


@needs_ext
@pytest.mark.parametrize("scratch_bytes", [0, 100, 5000, 1 << 20])
def test_native_fuzz_small_scratch(scratch_bytes):
    g = torch.Generator().manual_seed(7)
    for trial in range(20):
        experts, n, d = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (9, 300, 70))
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        rows, cols = _experts(experts, n, d, DTYPES[trial % 3], groups=1 + trial % 2, seed=trial)
        _check_native(rows, cols, _keeps(experts, n, k, seed=trial), n, scratch_bytes)


@needs_ext
def test_native_gives_the_tail_back_on_cpu():
    rows, cols = _experts(8, 1024, 256, torch.float32)
    before = rows[0].untyped_storage().nbytes()
    torch.ops.prunenet.slice_experts_(rows, cols, _keeps(8, 1024, 512), 1024, 4 << 20)
    assert rows[0].untyped_storage().nbytes() == before // 2


@needs_ext
def test_opcheck():
    experts, n, d = 3, 37, 11
    keep = _keeps(experts, n, 5)
    for scratch in (0, 4 << 20):
        rows, cols = _experts(experts, n, d, torch.float32)
        torch.library.opcheck(
            torch.ops.prunenet.slice_experts_.default,
            (rows, cols, keep, n, scratch),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static"),
        )


def _bad_calls():
    good = _keeps(3, 20, 4)
    yield "out of range", good.clone().index_fill_(1, torch.tensor([3]), 20), {}
    yield "sorted and unique", good.flip(1), {}
    yield "int64", good.int(), {}
    yield "2-D", good[0], {}
    yield "experts", good[:2], {}
    yield "multiple of width", good, {"width": 7}
    yield "contiguous", good, {"transposed": True}
    yield "requires grad", good, {"grad": True}
    yield "float32, float16 or bfloat16", good, {"dtype": torch.float64}


@needs_ext
@pytest.mark.parametrize("message, keep, case", list(_bad_calls()), ids=[c[0] for c in _bad_calls()])
def test_bad_calls_are_rejected_and_change_nothing(message, keep, case):
    rows, cols = _experts(3, 20, 6, case.get("dtype", torch.float32))
    if case.get("transposed"):
        cols = [torch.randn(3, 20, 6).transpose(1, 2)]
    if case.get("grad"):
        rows[0].requires_grad_(True)
    before = [t.detach().clone() for t in rows + cols]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.prunenet.slice_experts_(rows, cols, keep, case.get("width", 20), 4 << 20)
    assert all(torch.equal(t.detach(), b) for t, b in zip(rows + cols, before, strict=True))


@pytest.mark.parametrize("backend", ["auto", "torch"] + (["native"] if ops.available() else []))
def test_wrapper_backends_agree_with_reference(backend):
    rows, cols = _experts(4, 50, 9, torch.bfloat16)
    keep = _keeps(4, 50, 21)
    exp_rows, exp_cols = slice_experts_ref(rows, cols, keep, 50)
    slice_experts_(rows, cols, keep, 50, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(rows + cols, exp_rows + exp_cols, strict=True))


def test_wrapper_rejects_bad_input_on_torch_path():
    rows, cols = _experts(4, 50, 9, torch.float32)
    with pytest.raises(ValueError, match="sorted, unique"):
        slice_experts_(rows, cols, _keeps(4, 50, 5).flip(1), 50, backend="torch")
    with pytest.raises(ValueError, match="experts"):
        slice_experts_(rows, cols, _keeps(3, 50, 5), 50, backend="torch")


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scratch_bytes", [0, 4096, 4 << 20])
def test_cuda_matches_reference(dtype, scratch_bytes):
    # Mixtral-like (8 x 14336 x 4096 would be 1.8 GiB per tensor: a few experts of that width instead),
    # a Qwen3-MoE expert shape, and odd small ones.
    for experts, n, d, groups in [(2, 14336, 4096, 2), (16, 768, 2048, 2), (5, 431, 123, 1), (3, 7, 1, 3)]:
        rows, cols = _experts(experts, n, d, dtype, groups, device="cuda")
        _check_native(rows, cols, _keeps(experts, n, max(1, (7 * n) // 10), device="cuda"), n, scratch_bytes)


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_opcheck():
    rows, cols = _experts(3, 20, 6, torch.float32, device="cuda")
    torch.library.opcheck(
        torch.ops.prunenet.slice_experts_.default,
        (rows, cols, _keeps(3, 20, 4, device="cuda"), 20, 64),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static"),
    )
