"""Hand-written compute kernels (installed as ``prunenet.kernels``).

One module per op, each importing ``triton`` (import them only where it is installed):

* :mod:`prunenet.kernels.gram`: Gram matrices of gathered rows for a batch of layers.
* :mod:`prunenet.kernels.ks`: exact two-sample Kolmogorov-Smirnov statistics for a batch of layers.

This package file itself needs no triton; it holds the index helper shared with the pure-PyTorch
reward path.
"""

from __future__ import annotations

import torch


def complement_rows(keeps: torch.Tensor, n: int) -> torch.Tensor:
    """The rows not kept: ``(L, k)`` distinct indices in ``[0, n)`` -> ``(L, n - k)`` int64, ascending."""
    num, k = keeps.shape
    dropped = torch.ones(num, n, dtype=torch.bool, device=keeps.device)
    dropped.scatter_(1, keeps.long(), False)
    if int(dropped.sum()) != num * (n - k):
        raise ValueError("kept row indices must be distinct within each layer")
    return dropped.nonzero()[:, 1].view(num, n - k)
