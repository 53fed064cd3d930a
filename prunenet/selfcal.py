"""Self-calibration (``--method selfcal``): score FFN neurons by their contribution on self-generated probes.

The model is run forward on probe sequences *it generates itself* from its BOS token -- never a dataset
(:mod:`prunenet.probes`), unless the user hands over text of their own (``--calibration``, windows cut by
:mod:`prunenet.calibration`) -- and each neuron is scored from its activation statistics
(:mod:`prunenet.activations`) by its contribution to the FFN output, in the manner of Wanda (Sun et al.
2023, arXiv 2306.11695: ``|W| * ||x||``). By default it is calibration *data*-free, not forward-free: the name
says so.

Research variants: FLAP's fluctuation score (An et al. 2024, arXiv 2312.11983: ``Var(x_j) * ||W_:,j||^2``,
``score="flap"``) and uniformly random probe ids (``probe="random"``) are what the selection study measured
against the shipped method (``benchmarks/selection_study.py``); the shipped method uses generated probes and
the Wanda score.

The answer per FFN unit (a block, or one expert of a mixture-of-experts block, scored on the tokens routed
to it) is a sorted, unique ``(k,)`` int64 CPU vector of the neurons to keep.

Shapes: ``n`` FFN width, ``k`` kept neurons per unit, ``U`` units (``L`` layers, or ``L * E`` with ``E``
experts per block).
"""

from __future__ import annotations

import time

import torch

from .activations import ActivationStats, activation_stats
from .config import PruneConfig
from .probes import self_probes

SCORES = ("wanda", "flap")
"""Scores of :func:`neuron_scores`: ``"wanda"`` (shipped) and ``"flap"`` (a research variant)."""


def neuron_scores(stats: ActivationStats, score: str = "wanda") -> torch.Tensor:
    """``(U, n)`` float64 importance of every FFN neuron of every unit; higher is kept first.

    * ``"wanda"``: ``sqrt(E[h_j^2]) * ||W_out[:, j]||_2`` -- the RMS size of neuron ``j``'s contribution to
      the FFN output (Wanda's ``|W| * ||x||``, summed over the column it feeds: structured Wanda).
    * ``"flap"`` (research variant): ``Var(h_j) * ||W_out[:, j]||_2^2`` -- FLAP's fluctuation: how much the
      output would move if neuron ``j`` were replaced by its mean (FLAP then adds that mean to a bias; the
      models we must reload with stock ``transformers`` have no such bias, so we do not compensate).
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    norms = stats.out_norms
    scores = stats.mean_square().sqrt() * norms if score == "wanda" else stats.variance() * norms**2
    # An expert no probe token was routed to has no activations to go by: rank its neurons by the output
    # column they feed.
    return torch.where(stats.tokens > 0, scores, norms)


def top_k(scores: torch.Tensor, k: int, protect: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted ``(k,)`` int64 indices of the ``k`` largest ``scores`` ``(n,)``, ``protect`` ``(m,)`` always in.

    Ties are broken by the lower index (a stable sort), so the result is deterministic.
    """
    scores = scores.double().clone()
    if protect is not None and protect.numel():
        scores[protect] = float("inf")
    order = torch.sort(-scores, stable=True).indices
    return order[:k].sort().values


def selfcal_keeps(
    model: torch.nn.Module,
    k: int,
    *,
    seed: int = 0,
    probe: str = "generate",
    score: str = "wanda",
    sequences: int = PruneConfig.probe_sequences,
    length: int = PruneConfig.probe_length,
    timings: dict[str, float] | None = None,
    ids: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The ``selfcal`` method: kept neurons per FFN unit (sorted ``(k,)`` int64 CPU) from self-generated probes,
    or from the token ids ``ids`` ``(B, T)`` when given (windows of ``--calibration`` text,
    :func:`prunenet.calibration.calibration_windows`; ``seed``, ``probe``, ``sequences`` and ``length`` are
    then unused).

    ``seed`` fixes the probe sequences, hence the result. ``probe`` and ``score`` select the research
    variants (:data:`prunenet.probes.PROBES`, :data:`SCORES`). ``model`` may have its blocks offloaded
    (:mod:`prunenet.offload`). ``timings``, when given, receives the seconds of the two phases:
    ``probe_s`` (generating ``sequences x length`` tokens, one decoding step per token; not with ``ids``) and
    ``stats_s`` (one forward pass over them). Measured costs: docs/methods.md and docs/large-models.md.
    """
    timings = {} if timings is None else timings
    if ids is None:
        tick = time.perf_counter()
        ids = self_probes(model, kind=probe, sequences=sequences, length=length, seed=seed)
        timings["probe_s"] = time.perf_counter() - tick
    else:  # where the ids go: the embeddings' device (an offloaded model's blocks are elsewhere)
        ids = ids.to(model.get_input_embeddings().weight.device)
    return [top_k(unit_scores, k) for unit_scores in selfcal_scores(model, ids, score, timings)]


def selfcal_scores(
    model: torch.nn.Module, ids: torch.Tensor, score: str = "wanda", timings: dict[str, float] | None = None
) -> torch.Tensor:
    """``(U, n)`` float32 CPU scores of every FFN neuron of every unit, from one forward pass over ``ids``
    ``(B, T)`` (on the embeddings' device). Rounded to float32 *before* anyone ranks them: a run that selects
    and one that reads the saved scores (:mod:`prunenet.scores`) then keep the same neurons, bit for bit.
    ``timings``, when given, receives ``stats_s``."""
    tick = time.perf_counter()
    stats = activation_stats(model, ids)
    scores = neuron_scores(stats, score).float().cpu()
    if timings is not None:
        timings["stats_s"] = time.perf_counter() - tick
    return scores
