"""The spectral reward: how well a row-sliced state matrix keeps the original's singular values.

For layer ``i`` with state matrix ``W_i`` ``(n, d)`` and kept rows ``keep_i`` ``(k,)``, the reward is
``1 / D_i`` where ``D_i`` is the two-sample Kolmogorov-Smirnov statistic between the singular
values of ``W_i`` and of ``W_i[keep_i]``.

Both backends compute the singular values as ``sqrt(eigvalsh(G))`` of the ``d x d`` Gram matrix
``G = W[keep]^T W[keep]`` (clamped at 0), one batched reward per episode, or, for states with no more
rows than columns (``n <= d``: experts), of the ``k x k`` ``W[keep] W[keep]^T``, gathered from the run's
``W W^T`` (:func:`prunenet.ops.gram_side`; on either backend that route is pure PyTorch):

* ``torch``: pure PyTorch on any device (the Gram matrices by matmul, the KS statistic by
  ``searchsorted``). On CPU the eigen-solve goes to LAPACK's ``ssyev`` through scipy.
* ``triton``: the kernels of :mod:`prunenet.kernels` (CUDA): a fused gather + Gram kernel for all
  layers, ``torch.linalg.eigvalsh`` batched, and one KS kernel launch for all layers.

``auto`` picks ``triton`` on CUDA when the ``triton`` package is installed, ``torch`` elsewhere.
Where more rows are kept than dropped, both use ``W^T W - W[drop]^T W[drop]`` with ``W^T W``
computed once per training run (:func:`prepare_reward`).

Why the Gram route and not ``svdvals`` of ``W[keep]``: on 2 CPU cores a whole episode is 2.3-2.6x
faster than per-layer ``svdvals`` + scipy for the OPT-125m and SmolLM2-135M shapes
(``benchmarks/bench_reward.py``), and float32 is accurate enough: on SmolLM2-135M's real gate_proj
weights at ratio 0.3 the singular values are within 4e-6 (top half of the spectrum) and 8e-5
(bottom half, worst at the smallest) of float64 SVD, relatively (``tests/test_kernels.py`` checks
1e-3 on random matrices).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .ops import complement_rows, gram_side, keeps_full_grams, resolve_reward_backend, use_complement

log = logging.getLogger(__name__)

# Reward when the spectra are identical (D == 0, e.g. nothing is removed). Any D > 0 is at
# least 1 / (number of singular values), so 1/D <= d; this cap sits well above that.
REWARD_AT_ZERO = 1e6

# Upper bound on the float32 bytes of gathered rows and Gram matrices held at once by the torch
# path: keeps memory bounded on 7B-class layers (32 x 7705 x 4096 floats would be 4 GB at once).
CHUNK_BYTES = 256 * 2**20
# The same bound for the Gram matrices of the Triton path, which gathers nothing (13B: 105 MB per layer).
_TRITON_CHUNK_BYTES = 2 * 2**30


def singular_values(matrices: torch.Tensor) -> torch.Tensor:
    """Singular values ``(..., min(m, d))`` of ``(..., m, d)`` matrices by SVD, ascending, float32.

    The SVD runs in float32 whatever the input dtype (half-precision LAPACK does not exist and
    would lose the small singular values). The reward uses :func:`spectra_from_gram` instead; this
    is the per-layer method of the original implementation, kept as a reference.
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


def spectra_from_gram(grams: torch.Tensor, count: int, solve_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The largest ``count`` singular values from Gram matrices: ``sqrt(eigvalsh(G))``, clamped at 0.

    Args:
        grams: ``(B, d, d)`` float32 symmetric (only the lower triangle is read).
        count: values to return, ``min(rows, d)`` (the other ``d - count`` eigenvalues are 0).
        solve_dtype: the eigen-solve's precision. The row-Gram route (``k x k``, full rank) solves in
            float64: in float32 its smallest eigenvalues were off by enough to reorder a kept singular
            value and an original one that interlace closely (39 of 40 rows kept: KS 1/26 instead of
            1/40), which the ``d x d`` route's did not; a ``k x k`` float64 solve still costs far less.
    Returns:
        ``(B, count)`` float32, ascending, on the grams' device.

    On CPU the eigen-solve is LAPACK ``ssyev`` through scipy, one matrix at a time: 0.33 s for 30
    SmolLM2-sized (576 x 576) matrices on 2 cores vs 0.46-0.50 s for ``torch.linalg.eigvalsh``
    (MKL's ``ssyevd``, which barely uses the second core at this size). float32 suffices: the errors
    are ~1e-7 relative to the largest eigenvalue, and float64 costs 1.3-1.6x.
    """
    if grams.device.type == "cpu":
        import scipy.linalg

        values = grams.new_empty(grams.shape[:-1], dtype=solve_dtype)
        for g, out in zip(grams.to(solve_dtype).numpy(), values.numpy(), strict=True):
            out[:] = scipy.linalg.eigh(g, eigvals_only=True, driver="ev", check_finite=False)
    else:
        values = torch.linalg.eigvalsh(grams.to(solve_dtype))
    # Rounding leaves the zero eigenvalues of a rank-deficient G slightly negative.
    return values[..., values.shape[-1] - count :].clamp_min(0).sqrt().float()


@dataclass
class RewardReference:
    """What the reward needs that stays fixed over a training run; from :func:`prepare_reward`.

    Attributes:
        backend: the resolved backend, ``"torch"`` or ``"triton"``.
        spectra: ``(L, min(n, d))`` float32 ascending singular values of each full ``W_i``, on the
            states' device.
        full_grams: ``(L, d, d)`` float32 ``W_i^T W_i`` (``(L, n, n)`` ``W_i W_i^T`` where ``n <= d``) on the
            states' device (a tensor, or a :class:`SpilledGrams` file) when the episodes use it for ``k``
            (:func:`prunenet.ops.keeps_full_grams`; else ``None``).
        k: the kept rows per layer this was prepared for (``None``: unknown, no complement route).
    """

    backend: str
    spectra: torch.Tensor
    full_grams: torch.Tensor | SpilledGrams | None = None
    k: int | None = None

    def __len__(self) -> int:
        return self.spectra.shape[0]


class StateSequence(Sequence):
    """A sequence of ``L`` state matrices ``(n, d)`` that knows their shape and device without loading them.

    Training and the reward index state matrices one at a time, so a subclass may load each on
    access (e.g. from a checkpoint on disk, :class:`prunenet.streaming.CheckpointStates`) instead of
    holding all ``L``. Subclasses set ``shape`` (``(n, d)``), ``dtype`` and ``device`` and guarantee
    every item has them.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device


def state_shape(states: Sequence[torch.Tensor]) -> tuple[tuple[int, int], torch.device]:
    """``((n, d), device)`` of the state matrices, without loading one from a :class:`StateSequence`."""
    if isinstance(states, StateSequence):
        return tuple(states.shape), states.device
    return tuple(states[0].shape), states[0].device


class SpilledGrams:
    """``(L, d, d)`` float32 Gram matrices kept in a file rather than in memory (``d``: their size).

    Reading matrix ``i`` costs one ``d*d*4``-byte read (64 MiB for LLaMA-2-7B) from the page cache or
    disk; memory holds only what the caller keeps. Indexing mirrors a tensor's: ``[i]`` is ``(d, d)``,
    ``[a:b]`` is ``(b - a, d, d)``, both on ``device``. The file has no name (``TemporaryFile``): the
    system frees it when this object is gone, even if the process is killed.
    """

    def __init__(self, count: int, d: int, device: torch.device, folder: str | None = None):
        import tempfile

        self.shape = (count, d, d)
        self.device = torch.device(device)
        self._file = tempfile.TemporaryFile(prefix="prunenet-grams-", dir=folder, buffering=0)
        self._file.truncate(count * d * d * 4)

    def __len__(self) -> int:
        return self.shape[0]

    def __setitem__(self, i: int, gram: torch.Tensor) -> None:
        g = gram.detach().to("cpu", torch.float32).contiguous()
        self._file.seek(i * g.numel() * 4)
        self._file.write(memoryview(g.view(-1).view(torch.uint8).numpy()))

    def __getitem__(self, index: int | slice) -> torch.Tensor:
        if isinstance(index, slice):
            return torch.stack([self[i] for i in range(*index.indices(len(self)))])
        d = self.shape[1]
        out = torch.empty(d, d, dtype=torch.float32)
        self._file.seek(index * d * d * 4)
        self._file.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out.to(self.device)

    def __del__(self):
        with contextlib.suppress(AttributeError, OSError):
            self._file.close()


def _check_states(states: Sequence[torch.Tensor]) -> None:
    if not len(states):
        raise ValueError("no state matrices")
    if isinstance(states, StateSequence):  # checked when it was built; do not load every matrix here
        return
    first = states[0]
    for w in states:
        if w.dim() != 2 or w.shape != first.shape or w.device != first.device:
            raise ValueError(
                f"state matrices must be 2-D with one shape and device; got {tuple(first.shape)} on "
                f"{first.device} and {tuple(w.shape)} on {w.device}"
            )


def _torch_gram(w: torch.Tensor, rows: torch.Tensor | None = None, side: str = "cols") -> torch.Tensor:
    """``(d, d)`` float32 ``W[rows]^T W[rows]`` (all rows for ``None``), one matmul; with ``side="rows"``
    the ``(k, k)`` ``W[rows] W[rows]^T``.

    Always on a contiguous float32 copy, so a layer's Gram matrix does not depend on how the
    weight is laid out or batched with others.
    """
    m = w if rows is None else w.index_select(0, rows)
    m = m.float().contiguous()
    return m @ m.mT if side == "rows" else m.mT @ m


def prepare_reward(
    states: Sequence[torch.Tensor], k: int | None = None, backend: str = "auto", spill_grams: bool = False
) -> RewardReference:
    """Reference spectra (and, where useful, the full Gram matrices) for :func:`episode_rewards`.

    Args:
        states: ``L`` state matrices ``(n, d)``, one shape, dtype and device (a list, or a
            :class:`StateSequence` that loads each on access: they are read once, in order).
        k: kept rows per layer in the coming episodes; with it, the full Gram matrices are kept
            when the episodes use them (the complement route, ``(L, d, d)`` float32: 2.1 GB for
            LLaMA-2-7B; or, where ``n <= d``, ``W W^T`` ``(L, n, n)``).
        backend: ``auto``, ``torch`` or ``triton`` (see :func:`prunenet.ops.resolve_reward_backend`).
        spill_grams: keep those Gram matrices in a temporary file (:class:`SpilledGrams`) instead of
            memory; the rewards are bit-identical either way.

    Every layer is computed on its own (the eigen-solves too), so the result does not depend on how
    the states are held or batched. At most ``CHUNK_BYTES`` of Gram matrices are held at once besides
    those kept.
    """
    _check_states(states)
    (n, d), device = state_shape(states)
    backend = resolve_reward_backend(backend, device)
    side = gram_side(n, d)
    if side == "rows":
        full_gram = lambda w: _torch_gram(w, side="rows")  # noqa: E731
    elif backend == "triton":
        from prunenet.kernels import gram as kgram

        full_gram = lambda w: kgram.full_gram([w])[0]  # noqa: E731
    else:
        full_gram = _torch_gram
    size = n if side == "rows" else d
    count = len(states)
    if not keeps_full_grams(n, d, k, backend):
        full = None
    elif spill_grams:
        full = SpilledGrams(count, size, device)
    else:
        full = torch.empty(count, size, size, dtype=torch.float32, device=device)
    spectra = torch.empty(count, min(n, d), dtype=torch.float32, device=device)
    # Chunks of layers, each matrix on its own: the Gram matmuls of a chunk, then its eigen-solves.
    # Alternating one matmul and one scipy solve per layer ran 1.6-2x slower on CPU (measured):
    # torch's OpenMP threads keep spinning after each matmul while LAPACK wants the cores.
    per_chunk = max(1, CHUNK_BYTES // (4 * size * size))
    for start in range(0, count, per_chunk):
        stop = min(start + per_chunk, count)
        in_memory = isinstance(full, torch.Tensor)  # then the kept Gram matrices are computed in place
        grams = full[start:stop] if in_memory else torch.empty(stop - start, size, size, device=device)
        for i in range(start, stop):
            grams[i - start] = full_gram(states[i])
        spectra[start:stop] = spectra_from_gram(grams, min(n, d), _solve_dtype(side))
        if isinstance(full, SpilledGrams):
            for i in range(start, stop):
                full[i] = grams[i - start]
    return RewardReference(backend=backend, spectra=spectra, full_grams=full, k=k)


def reference_spectra(states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Singular values of each full state matrix ``(n, d)``: a list of ``(min(n, d),)`` float32 on CPU.

    Computed the way the reward computes the sliced spectra (torch backend, Gram + eigen-solve).
    :func:`prepare_reward` is the way to set up a training run (it also keeps ``W^T W``).
    """
    return list(prepare_reward(states, backend="torch").spectra.cpu())


def _solve_dtype(side: str) -> torch.dtype:
    """The eigen-solve's precision for a Gram side (see :func:`spectra_from_gram`)."""
    return torch.float64 if side == "rows" else torch.float32


def _torch_spectra(states, keeps: torch.Tensor, full: torch.Tensor | None) -> torch.Tensor:
    """``(L, min(k, d))`` float32 singular values of every ``W_i[keep_i]``, pure PyTorch."""
    (n, d), device = state_shape(states)
    k = keeps.shape[1]
    side = gram_side(n, d)
    complement = side == "cols" and full is not None and use_complement(n, k)
    rows = complement_rows(keeps, n) if complement else keeps

    def gram(i: int) -> torch.Tensor:
        index = rows[i].to(device)
        if side == "rows":  # (k, k) W[keep] W[keep]^T: the (keep, keep) block of W W^T where that is kept
            return full[i][index][:, index] if full is not None else _torch_gram(states[i], index, side="rows")
        return full[i] - _torch_gram(states[i], index) if complement else _torch_gram(states[i], index)

    size = k if side == "rows" else d
    per_chunk = max(1, CHUNK_BYTES // (4 * (rows.shape[1] * d + size * size)))
    out = []
    for start in range(0, len(states), per_chunk):
        grams = torch.stack([gram(i) for i in range(start, min(start + per_chunk, len(states)))])
        out.append(spectra_from_gram(grams, min(k, d), _solve_dtype(side)))
    return torch.cat(out)


def _triton_spectra(states, keeps: torch.Tensor, full: torch.Tensor | None) -> torch.Tensor:
    """As :func:`_torch_spectra`, with the fused gather + Gram kernel (one launch per chunk of layers); states
    with ``n <= d`` take the PyTorch rows route (a gather from ``W W^T``, no kernel to fuse)."""
    from prunenet.kernels.gram import kept_gram

    (n, d), _ = state_shape(states)
    if gram_side(n, d) == "rows":
        return _torch_spectra(states, keeps, full)
    k = keeps.shape[1]
    per_chunk = max(1, _TRITON_CHUNK_BYTES // (4 * d * d))
    out = []
    for start in range(0, len(states), per_chunk):
        stop = min(start + per_chunk, len(states))
        chunk = [states[i] for i in range(start, stop)]
        grams = kept_gram(chunk, keeps[start:stop], None if full is None else full[start:stop])
        out.append(spectra_from_gram(grams, min(k, d)))
    return torch.cat(out)


def episode_rewards(
    states: Sequence[torch.Tensor],
    keeps: Sequence[torch.Tensor],
    references: RewardReference | Sequence[torch.Tensor],
    backend: str | None = None,
) -> torch.Tensor:
    """Rewards ``1 / KS`` for every layer of one episode, in one batched computation.

    Args:
        states: ``L`` state matrices ``(n, d)``, any float dtype, one device.
        keeps: ``L`` kept-row index vectors ``(k,)`` (int64, distinct, same ``k`` for all layers).
        references: a :class:`RewardReference` from :func:`prepare_reward`, or the ``L`` reference
            spectra from :func:`reference_spectra`.
        backend: overrides the reference's backend (``auto`` for plain spectra when ``None``).
    Returns:
        ``(L,)`` float64 rewards on CPU.
    """
    if not (len(states) == len(keeps) == len(references)):
        raise ValueError(f"got {len(states)} states, {len(keeps)} keeps and {len(references)} reference spectra")
    _check_states(states)
    if isinstance(references, RewardReference):
        ref_spectra, full = references.spectra, references.full_grams
        backend = resolve_reward_backend(backend or references.backend, state_shape(states)[1])
    else:
        ref_spectra, full = torch.stack(list(references)), None
        backend = resolve_reward_backend(backend or "auto", state_shape(states)[1])
    (n, _), device = state_shape(states)
    k = keeps[0].numel()
    if k == n:
        # Every row kept: W[keep] is W with its rows permuted, the same spectrum, so D = 0 exactly.
        return reward_from_ks(torch.zeros(len(states), dtype=torch.float64))
    keeps = torch.stack([keep.to(device) for keep in keeps])
    ref_spectra = ref_spectra.to(device)
    if backend == "triton":
        from prunenet.kernels.ks import ks_statistic as ks_triton

        ks = ks_triton(ref_spectra, _triton_spectra(states, keeps, full))
    else:
        ks = ks_statistic(ref_spectra, _torch_spectra(states, keeps, full))
    return reward_from_ks(ks.cpu())
