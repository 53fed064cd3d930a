"""A native slicing op against its out-of-place reference: the same tensors bit for bit, in the same storage."""

from __future__ import annotations

import torch


def check_native(op, reference, rows, cols, keep, width, scratch_bytes=4 << 20, contiguous=False):
    """Run ``op(rows, cols, keep, width, scratch_bytes)``, which slices ``rows`` and ``cols`` in place, and
    check every tensor against ``reference(rows, cols, keep, width)`` (computed first, out of place): the
    same shape, dtype and values, and still in the storage it had. With ``contiguous`` each result must
    also be contiguous (an op that takes only contiguous inputs; one that takes row-strided views keeps
    their strides instead)."""
    exp_rows, exp_cols = reference(rows, cols, keep, width)
    storages = [t.untyped_storage().data_ptr() for t in rows + cols]
    op(rows, cols, keep, width, scratch_bytes)
    for got, exp in zip(rows + cols, exp_rows + exp_cols, strict=True):
        assert got.shape == exp.shape and got.dtype == exp.dtype
        assert got.is_contiguous() or not contiguous
        assert torch.equal(got, exp)  # a copy: exact
    assert [t.untyped_storage().data_ptr() for t in rows + cols] == storages  # in place
