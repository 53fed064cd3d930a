"""Gathered Gram matrices of row subsets, for a batch of layers: ``G_i = W_i[rows_i]^T W_i[rows_i]``.

The spectral reward needs the singular values of ``W_i[keep_i]`` (``k x d``) for every layer of an
episode. They are the square roots of the eigenvalues of the ``d x d`` Gram matrix, and the Gram
matrix can be formed without materialising ``W_i[keep_i]``: the kernel reads the kept rows straight
from each layer's weight (the gather is fused into the loads), multiplies in the input dtype on the
tensor cores where there are any, and accumulates in float32.

When fewer rows are dropped than kept, ``G_i = W_i^T W_i - W_i[drop_i]^T W_i[drop_i]`` reads only
the ``n - k`` dropped rows plus the ``d x d`` Gram matrix of the whole layer, which does not change
between episodes and is computed once (:func:`full_gram`). :func:`kept_gram` chooses the route
(:func:`prunenet.ops.use_complement`, the ``triton`` rule).

One launch covers every layer of a batch: the layers' weights are separate tensors (views of a
model's parameters, not one stacked tensor), so the kernel receives the first one and each layer's
address relative to it, and never needs a copy of them. Layers must share shape, strides (any),
dtype and device.

Contents, as for every op here: the private ``@triton.jit`` kernel :func:`_gram_kernel`, its
launcher :func:`gram_rows`, the public :func:`kept_gram` (+ :func:`full_gram`), and the pure-PyTorch
reference :func:`kept_gram_ref`.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernel runs in Triton's
interpreter on CPU tensors; that is how CI tests it. Otherwise the tensors must be on a CUDA device.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from prunenet.ops import complement_rows, use_complement

__all__ = ["full_gram", "gram_rows", "kept_gram", "kept_gram_ref"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _gram_kernel(
    w_base,  # the first layer's weight (n, d): every layer is addressed relative to it
    w_offsets,  # (L,) int64: (address of layer l's weight - w_base's) / (VEC * element size)
    rows_ptr,  # (L, R) int32: the rows to sum over, per layer (layer stride may be 0: same rows for all)
    base_ptr,  # (L, D, D) float32, contiguous: subtracted from (SUBTRACT) or unused
    out_ptr,  # (L, D, D) float32, contiguous
    tile_i_ptr,  # (T,) int32: row-block of each lower-triangle output tile
    tile_j_ptr,  # (T,) int32: column-block of each tile, <= its row-block
    R,
    D,
    stride_row,  # the weights' strides, in elements (one layout for all layers)
    stride_col,
    rows_layer_stride,
    SUBTRACT: tl.constexpr,
    VEC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One (BLOCK_D x BLOCK_D) tile of one layer's Gram matrix; grid = (lower-triangle tiles, layers).

    G is symmetric, so only tiles on or below the diagonal are computed (about half the work), and
    each is stored twice (as itself and transposed). Programs of one layer are adjacent in the grid
    so the row blocks they share stay in L2.
    """
    tile = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    ti = tl.load(tile_i_ptr + tile)
    tj = tl.load(tile_j_ptr + tile)
    # Why a base pointer and offsets in units of VEC elements (16 bytes when every layer is 16-byte
    # aligned) rather than a table of addresses cast to pointers: an address read from memory carries
    # no alignment information (tl.multiple_of does not survive the int-to-pointer cast), and the
    # compiler then loads the weights one element at a time; the product with the constant VEC proves
    # the alignment, and the loads become 16-byte vectors (seen in the sm_90 PTX: ld.global.v4 instead
    # of 64 ld.global.b16 per step). The strides are arguments for the same reason: Triton
    # specialises an argument equal to 1 and multiples of 16.
    w = w_base + tl.load(w_offsets + layer) * VEC

    cols_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    cols_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    in_i = cols_i < D
    in_j = cols_j < D
    offs_i = cols_i.to(tl.int64) * stride_col
    offs_j = cols_j.to(tl.int64) * stride_col

    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        in_r = r < R
        # The fused gather: row indices first, then the two column strips of those rows only.
        idx = tl.load(rows_ptr + layer * rows_layer_stride + r, mask=in_r, other=0).to(tl.int64)
        row_offs = idx * stride_row
        a = tl.load(w + row_offs[:, None] + offs_i[None, :], mask=in_r[:, None] & in_i[None, :], other=0.0)
        b = tl.load(w + row_offs[:, None] + offs_j[None, :], mask=in_r[:, None] & in_j[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)

    out_offs = layer * D * D + cols_i[:, None] * D + cols_j[None, :]
    mask = in_i[:, None] & in_j[None, :]
    if SUBTRACT:
        acc = tl.load(base_ptr + out_offs, mask=mask, other=0.0) - acc
    tl.store(out_ptr + out_offs, acc, mask=mask)
    # The mirrored tile; a diagonal tile is its own mirror and is stored once.
    out_offs_t = layer * D * D + cols_j[None, :] * D + cols_i[:, None]
    tl.store(out_ptr + out_offs_t, acc, mask=mask & (ti != tj))


def _config(dtype: torch.dtype) -> dict:
    """Tile sizes and launch options.

    GPU: not yet timed on a GPU. 64 x 64 output tiles keep the float32 accumulator at 16 KB per
    program; float32 inputs take a shorter row block because their tiles are twice the bytes.
    Interpreter: every block step costs a few numpy calls whatever its size, so big blocks are what
    keeps it fast (k=1075, d=576: 6 s per call with the GPU blocks, under 1 s with these).
    """
    if _interpreting():
        # The interpreter's dot multiplies numpy arrays and keeps bfloat16 as raw uint16 bits, so
        # bfloat16 tiles are widened first; exact, since bf16 x bf16 products fit in float32.
        return dict(BLOCK_D=128, BLOCK_R=256, INPUT_PRECISION="ieee", UPCAST=True)
    if dtype == torch.float32:
        # "ieee": TF32 (10-bit mantissa) would put ~1e-3 relative errors into G, which the small
        # eigenvalues cannot afford; 16-bit inputs multiply exactly into the float32 accumulator.
        return dict(BLOCK_D=64, BLOCK_R=32, INPUT_PRECISION="ieee", UPCAST=False, num_warps=4, num_stages=3)
    return dict(BLOCK_D=64, BLOCK_R=64, INPUT_PRECISION=None, UPCAST=False, num_warps=4, num_stages=3)


def _check_states(states: Sequence[torch.Tensor]) -> tuple[int, int, torch.dtype, torch.device]:
    if len(states) == 0:
        raise ValueError("no state matrices")
    first = states[0]
    if first.dim() != 2:
        raise ValueError(f"state matrices must be 2-D (n, d), got shape {tuple(first.shape)}")
    for w in states:
        if (w.shape, w.stride(), w.dtype, w.device) != (first.shape, first.stride(), first.dtype, first.device):
            raise ValueError(
                "all state matrices must share shape, strides, dtype and device; got "
                f"{tuple(first.shape)} {first.stride()} {first.dtype} {first.device} and "
                f"{tuple(w.shape)} {w.stride()} {w.dtype} {w.device}"
            )
    if first.dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {first.dtype}; the Gram kernel takes float32, float16 and bfloat16")
    if first.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"the Triton Gram kernel needs CUDA tensors, got {first.device} "
            "(for testing on CPU set TRITON_INTERPRET=1 before importing it)"
        )
    n, d = first.shape
    return n, d, first.dtype, first.device


def gram_rows(
    states: Sequence[torch.Tensor],
    rows: torch.Tensor,
    base: torch.Tensor | None = None,
    *,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Launcher: ``G_i = sum_{r in rows_i} W_i[r]^T W_i[r]``, or ``base_i`` minus that sum.

    Args:
        states: ``L`` weights ``(n, d)`` (float32, float16 or bfloat16; any strides), same shape,
            strides, dtype and device.
        rows: ``(L, R)`` or ``(R,)`` (the same rows for every layer) integer row indices in
            ``[0, n)``; ``R`` may be 0. Indices may repeat (a repeated row counts twice).
        base: optional ``(L, d, d)`` float32 matrices to subtract the sums from.
        blocks: ``(BLOCK_D, BLOCK_R)`` overriding the tile sizes (powers of two, at least 16); the
            tests use small ones to cover several tiles and ragged edges in the interpreter.
    Returns:
        ``(L, d, d)`` float32, symmetric, on the states' device.
    """
    n, d, dtype, device = _check_states(states)
    num = len(states)
    if rows.dim() not in (1, 2) or (rows.dim() == 2 and rows.shape[0] != num):
        raise ValueError(f"rows must be (R,) or ({num}, R), got {tuple(rows.shape)}")
    if rows.numel() and bool(((rows < 0) | (rows >= n)).any()):
        raise ValueError(f"row indices must be in [0, {n})")
    rows = rows.to(device=device, dtype=torch.int32).contiguous()
    if rows.dim() == 1:  # one index vector for all layers: a zero layer stride, no copy per layer
        rows = rows.unsqueeze(0).expand(num, -1)
    if base is not None:
        if base.shape != (num, d, d) or base.dtype != torch.float32:
            raise ValueError(f"base must be ({num}, {d}, {d}) float32, got {tuple(base.shape)} {base.dtype}")
        base = base.to(device).contiguous()

    out = torch.empty(num, d, d, dtype=torch.float32, device=device)
    if d == 0:
        return out
    cfg = _config(dtype)
    if blocks is not None:
        cfg["BLOCK_D"], cfg["BLOCK_R"] = blocks
    tiles = torch.tril_indices(triton.cdiv(d, cfg["BLOCK_D"]), triton.cdiv(d, cfg["BLOCK_D"]), device=device)
    tiles = tiles.to(torch.int32)
    size = states[0].element_size()
    deltas = [w.data_ptr() - states[0].data_ptr() for w in states]
    if any(delta % size for delta in deltas):
        raise ValueError("state matrices must be aligned to their element size")
    vec = 16 // size if all(delta % 16 == 0 for delta in deltas) and states[0].data_ptr() % 16 == 0 else 1
    grid = (tiles.shape[1], num)
    _gram_kernel[grid](
        states[0],
        torch.tensor([delta // (vec * size) for delta in deltas], dtype=torch.int64, device=device),
        rows,
        base if base is not None else out,  # never read unless SUBTRACT
        out,
        tiles[0].contiguous(),
        tiles[1].contiguous(),
        rows.shape[1],
        d,
        states[0].stride(0),
        states[0].stride(1),
        rows.stride(0),
        SUBTRACT=base is not None,
        VEC=vec,
        **cfg,
    )
    return out


def full_gram(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """``W_i^T W_i`` for every layer: ``(L, d, d)`` float32 (the base of the complement route)."""
    n = states[0].shape[0]
    return gram_rows(states, torch.arange(n, device=states[0].device))


def kept_gram(
    states: Sequence[torch.Tensor], keeps: torch.Tensor, full_grams: torch.Tensor | None = None
) -> torch.Tensor:
    """``W_i[keep_i]^T W_i[keep_i]`` for every layer, by the cheaper route.

    Args:
        states: ``L`` weights ``(n, d)``, as for :func:`gram_rows`.
        keeps: ``(L, k)`` distinct kept-row indices per layer.
        full_grams: ``(L, d, d)`` float32 ``W_i^T W_i`` from :func:`full_gram`; when given and
            :func:`prunenet.ops.use_complement` says so, the dropped rows are subtracted from it instead.
    Returns:
        ``(L, d, d)`` float32.
    """
    n = states[0].shape[0]
    if full_grams is not None and use_complement(n, keeps.shape[1], "triton"):
        return gram_rows(states, complement_rows(keeps.to(states[0].device), n), base=full_grams)
    return gram_rows(states, keeps)


def kept_gram_ref(
    states: Sequence[torch.Tensor], keeps: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`kept_gram`: materialised ``W[keep]``, one matmul per layer, in ``dtype``.

    Returns:
        ``(L, d, d)`` in ``dtype``.
    """
    out = []
    for w, keep in zip(states, keeps, strict=True):
        rows = w.index_select(0, keep.to(w.device).long()).to(dtype)
        out.append(rows.mT @ rows)
    return torch.stack(out)
