"""The spectral reward: how well a row-sliced state matrix keeps the original's singular values.

For layer ``i`` with state matrix ``W_i`` ``(n, d)`` and kept rows ``keep_i`` ``(k,)``, the reward is
``1 / D_i`` where ``D_i`` is the two-sample Kolmogorov-Smirnov statistic between the singular
values of ``W_i`` and of ``W_i[keep_i]``. This module is the pure-PyTorch reference path; it runs
anywhere. Batched GPU kernels plug in behind :func:`episode_rewards` (a later backend).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Reward when the spectra are identical (D == 0, e.g. nothing is removed). Any D > 0 is at
# least 1 / (number of singular values), so 1/D <= d; this cap sits well above that.
REWARD_AT_ZERO = 1e6

# Upper bound on the float32 bytes of gathered rows processed in one batched SVD: keeps memory
# bounded on 7B-class layers (32 x 8806 x 4096 floats would be 4.6 GB at once).
_CHUNK_BYTES = 256 * 2**20


def singular_values(matrices: torch.Tensor) -> torch.Tensor:
    """Singular values ``(..., min(m, d))`` of ``(..., m, d)`` matrices, ascending, float32.

    The SVD runs in float32 whatever the input dtype (half-precision LAPACK does not exist and
    would lose the small singular values).
    """
    return torch.linalg.svdvals(matrices.float()).flip(-1)


def ks_statistic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact two-sample Kolmogorov-Smirnov statistic ``sup_t |F_x(t) - F_y(t)|``, batched.

    Equal to ``scipy.stats.ks_2samp(x, y).statistic`` (ties included, unequal lengths allowed).

    Args:
        x: ``(..., p)`` samples.
        y: ``(..., q)`` samples; leading dimensions equal to ``x``'s.
    Returns:
        ``(...)`` float64 statistics.
    """
    x = x.double().sort(-1).values.contiguous()
    y = y.double().sort(-1).values.contiguous()
    p, q = x.shape[-1], y.shape[-1]
    # The empirical CDFs only change at sample points, so the supremum is attained on them.
    points = torch.cat([x, y], dim=-1)
    count_x = torch.searchsorted(x, points, right=True)
    count_y = torch.searchsorted(y, points, right=True)
    # |F_x - F_y| = |count_x * q - count_y * p| / (p q): exact in integers, then one rounding
    # to float64 of the reduced fraction h / lcm(p, q), as scipy's exact mode reports it.
    g = math.gcd(p, q)
    h = (count_x * (q // g) - count_y * (p // g)).abs().amax(-1)
    return h.double() / (p // g * q)


def reward_from_ks(ks: torch.Tensor) -> torch.Tensor:
    """``1 / D``, with :data:`REWARD_AT_ZERO` where ``D == 0``. Shape preserved, float64."""
    ks = ks.double()
    return torch.where(ks > 0, 1.0 / ks.clamp_min(1e-300), torch.full_like(ks, REWARD_AT_ZERO))


def reference_spectra(states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Singular values of each full state matrix ``(n, d)``: a list of ``(min(n, d),)`` float32 on CPU."""
    return [singular_values(w).cpu() for w in states]


def episode_rewards(
    states: Sequence[torch.Tensor], keeps: Sequence[torch.Tensor], references: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Rewards ``1 / KS`` for every layer of one episode.

    Args:
        states: ``L`` state matrices ``(n, d)``, any float dtype and device.
        keeps: ``L`` kept-row index vectors ``(k,)`` (int64, same ``k`` for all layers).
        references: ``L`` reference spectra from :func:`reference_spectra`.
    Returns:
        ``(L,)`` float64 rewards on CPU.
    """
    if not (len(states) == len(keeps) == len(references)):
        raise ValueError(f"got {len(states)} states, {len(keeps)} keeps and {len(references)} reference spectra")
    rewards = []
    # Layers of one model share (k, d), so consecutive layers batch into one SVD call.
    k, d = keeps[0].numel(), states[0].shape[-1]
    per_chunk = max(1, _CHUNK_BYTES // (4 * k * d))
    for start in range(0, len(states), per_chunk):
        stop = min(start + per_chunk, len(states))
        sliced = torch.stack([states[i].index_select(0, keeps[i].to(states[i].device)) for i in range(start, stop)])
        spectra = singular_values(sliced).cpu()
        ks = ks_statistic(torch.stack(list(references[start:stop])), spectra)
        rewards.append(reward_from_ks(ks))
    return torch.cat(rewards)
