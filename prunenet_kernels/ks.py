"""Exact two-sample Kolmogorov-Smirnov statistics for a batch of layers, in one launch.

For samples ``x`` (``p`` values) and ``y`` (``q`` values) with empirical CDFs ``F_x``, ``F_y``:

    D = sup_t |F_x(t) - F_y(t)| = max over t in x u y of |c_x(t) q - c_y(t) p| / (p q)

where ``c_x(t) = #{x <= t}``: the CDFs only step at sample points, so the supremum is attained on
them, and ties are handled by counting ``<=`` (a tied value contributes all its copies at once).
The kernel evaluates the integer numerator ``h = max |c_x(t) q/g - c_y(t) p/g|`` (``g = gcd(p, q)``)
exactly, each count by a branch-free binary search in the sorted samples; the launcher then rounds
``h / lcm(p, q)`` to float64 once. That is the value ``scipy.stats.ks_2samp(x, y).statistic``
reports (the same integer fraction, rounded once), bit for bit, and what
:func:`prunenet.reward.ks_statistic` computes with ``torch.searchsorted``.

Contents: the private kernel :func:`_ks_kernel` (+ the :func:`_count_le` helper), the launcher
:func:`ks_numerators`, the public :func:`ks_statistic` and the pure-PyTorch reference
:func:`ks_statistic_ref`. Under ``TRITON_INTERPRET=1`` it runs on CPU tensors (CI), otherwise on CUDA.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["ks_numerators", "ks_statistic", "ks_statistic_ref"]


@triton.jit
def _count_le(sorted_ptr, n, t, STEPS: tl.constexpr):
    """``#{s in sorted[:n] : s <= t}`` for each lane's ``t``: binary search for the first ``s > t``.

    ``STEPS = n.bit_length()`` halvings shrink ``[lo, hi)`` from ``n`` elements to none; finished
    lanes stop loading (masked) and keep their answer.
    """
    lo = tl.zeros(t.shape, dtype=tl.int32)
    hi = tl.zeros(t.shape, dtype=tl.int32) + n
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(sorted_ptr + mid, mask=active, other=0.0)
        right = active & (v <= t)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def _ks_kernel(
    x_ptr,  # (L, P) sorted ascending, contiguous
    y_ptr,  # (L, Q) sorted ascending, contiguous, same dtype as x
    out_ptr,  # (L,) int64: the numerators h
    P,
    Q,
    P_RED,  # p / gcd(p, q)
    Q_RED,  # q / gcd(p, q)
    STEPS_P: tl.constexpr,
    STEPS_Q: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per layer: every point of ``x`` and ``y`` is a candidate ``t``, BLOCK at a time."""
    layer = tl.program_id(0).to(tl.int64)
    xs = x_ptr + layer * P
    ys = y_ptr + layer * Q
    best = tl.zeros((BLOCK,), dtype=tl.int64)
    for start in range(0, P + Q, BLOCK):
        i = start + tl.arange(0, BLOCK)
        valid = i < P + Q
        from_x = i < P
        t_x = tl.load(xs + i, mask=valid & from_x, other=0.0)
        t_y = tl.load(ys + (i - P), mask=valid & ~from_x, other=0.0)
        t = tl.where(from_x, t_x, t_y)
        cx = _count_le(xs, P, t, STEPS_P).to(tl.int64)
        cy = _count_le(ys, Q, t, STEPS_Q).to(tl.int64)
        # |F_x - F_y| * lcm(p, q), an exact integer (at most lcm, far below 2^63).
        h = tl.abs(cx * Q_RED - cy * P_RED)
        best = tl.maximum(best, tl.where(valid, h, 0))
    tl.store(out_ptr + layer, tl.max(best, axis=0))


def _prepare(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both samples sorted, contiguous, 2-D and in one dtype (a common float type: comparisons exact)."""
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"leading dimensions differ: x {tuple(x.shape)}, y {tuple(y.shape)}")
    if x.shape[-1] == 0 or y.shape[-1] == 0:
        raise ValueError("both samples need at least one value")
    dtype = torch.promote_types(x.dtype, y.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64  # exact for the integers anyone would pass here
    x = x.to(dtype).sort(-1).values.reshape(-1, x.shape[-1]).contiguous()
    y = y.to(dtype).sort(-1).values.reshape(-1, y.shape[-1]).contiguous()
    return x, y


def ks_numerators(x: torch.Tensor, y: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Launcher: the exact integers ``h = D * lcm(p, q)`` for each row.

    Args:
        x: ``(..., p)`` samples (any order; sorted here), float or integer dtype.
        y: ``(..., q)`` samples with the same leading dimensions, on the same device.
        block: candidate points per program step (a power of two); default 256 on a GPU, 2048 in
            the interpreter, where each step costs numpy calls whatever its width.
    Returns:
        ``(...)`` int64 on the inputs' device.
    """
    lead = x.shape[:-1]
    x, y = _prepare(x, y)
    if x.device != y.device:
        raise ValueError(f"x is on {x.device}, y on {y.device}")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if x.device.type != "cuda" and not interpreting:
        raise ValueError(
            f"the Triton KS kernel needs CUDA tensors, got {x.device} "
            "(for testing on CPU set TRITON_INTERPRET=1 before importing it)"
        )
    p, q = x.shape[-1], y.shape[-1]
    g = math.gcd(p, q)
    block = block or (2048 if interpreting else 256)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    if x.shape[0]:
        _ks_kernel[(x.shape[0],)](
            x, y, out, p, q, p // g, q // g, STEPS_P=p.bit_length(), STEPS_Q=q.bit_length(), BLOCK=block
        )
    return out.view(lead)


def ks_statistic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact two-sample KS statistics, one per row, all rows in one launch.

    Equal to ``scipy.stats.ks_2samp(x[i], y[i]).statistic`` for every ``i`` (ties included, ``p != q``
    allowed).

    Args:
        x: ``(..., p)`` samples.
        y: ``(..., q)`` samples, same leading dimensions and device.
    Returns:
        ``(...)`` float64 on the inputs' device.
    """
    p, q = x.shape[-1], y.shape[-1]
    # One rounding of the reduced fraction h / lcm(p, q), as scipy's exact computation reports it.
    return ks_numerators(x, y).double() / (p // math.gcd(p, q) * q)


def ks_statistic_ref(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`ks_statistic` by brute force: every point against every sample.

    ``O((p + q) * max(p, q))`` memory per row: a test oracle, not for large batches.

    Args:
        x: ``(..., p)``; y: ``(..., q)``.
    Returns:
        ``(...)`` float64.
    """
    x, y = x.double(), y.double()
    p, q = x.shape[-1], y.shape[-1]
    points = torch.cat([x, y], dim=-1).unsqueeze(-1)  # (..., p + q, 1)
    count_x = (x.unsqueeze(-2) <= points).sum(-1)  # (..., p + q): #{x <= t}
    count_y = (y.unsqueeze(-2) <= points).sum(-1)
    g = math.gcd(p, q)
    h = (count_x * (q // g) - count_y * (p // g)).abs().amax(-1)
    return h.double() / (p // g * q)
