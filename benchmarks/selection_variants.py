"""Research variants of neuron selection that lost to the shipped methods (``selection_study.py`` measures them).

* **weight-only** (no forward pass, no text): REINFORCE variants of the paper's policy with other rewards
  (KS on the spectra of gate, up *and* down; Wasserstein-1 between spectra; retained energy), a per-layer
  baseline with normalised advantages, and richer policy inputs (the concatenated gate/up/down rows of each
  neuron). :func:`train_variant` trains them. The paper's own method lives in :mod:`prunenet.train`.
* **super weights**: neurons holding an outlier weight (Yu et al. 2024, arXiv 2411.07191), always kept by
  the ``+sw`` variants (:func:`super_weight_neurons`).

Nothing in the package imports this module.

Shapes: ``n`` FFN width, ``d`` hidden size, ``k`` kept neurons per layer, ``L`` layers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prunenet.policy import kept_log_prob, select_rows
from prunenet.reward import ks_statistic, reward_from_ks, spectra_from_gram
from prunenet.train import make_policy

REWARDS = ("ks", "ks3", "w1", "energy")


def super_weight_neurons(matrices: Sequence[torch.Tensor], factor: float = 20.0, limit: int = 8) -> torch.Tensor:
    """Neurons holding an outlier weight: ``(m,)`` int64, ``m <= limit``, sorted.

    Yu et al. (2024, arXiv 2411.07191) find a handful of scalar "super weights" in ``down_proj`` whose
    removal destroys a model; they locate them from activation spikes on one prompt. Without any input we
    use the weights alone: neuron ``j`` is an outlier when the largest ``|w|`` among its out-projection
    column exceeds ``factor`` times the median over neurons of that per-neuron maximum.

    Args:
        matrices: one layer's ``adapter.neuron_matrices`` (:class:`prunenet.adapters.ModelAdapter`); the last is
            the out-projection ``(n, d)``.
    """
    peak = matrices[-1].detach().float().abs().amax(dim=1).cpu()  # (n,)
    candidates = torch.nonzero(peak > factor * peak.median()).squeeze(1)
    if candidates.numel() > limit:
        candidates = candidates[torch.topk(peak[candidates], limit).indices]
    return candidates.sort().values


def _spectra(matrices: torch.Tensor, grams: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Singular values ``(M, d)`` of ``M`` row-sliced matrices ``matrices[:, keep]`` (``(M, n, d)`` in).

    ``W[keep]^T W[keep] = W^T W - W[drop]^T W[drop]`` (``grams``: the full ``(M, d, d)``): cheaper while
    fewer rows are dropped than kept, which is every ratio below 0.5.
    """
    n = matrices.shape[1]
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    dropped = matrices[:, mask]
    kept_grams = grams - dropped.mT @ dropped
    return spectra_from_gram(kept_grams, min(keep.numel(), matrices.shape[2]))


def layer_objective(
    reward: str, matrices: torch.Tensor, grams: torch.Tensor, full: torch.Tensor, keep: torch.Tensor
) -> float:
    """One layer's weight-only objective for kept rows ``keep`` (higher is better).

    Args:
        reward: ``"ks"`` (the paper's ``1/D`` on the first in-projection only), ``"ks3"`` (mean of ``1/D``
            over gate, up and down), ``"w1"`` (``1 / W1`` between the singular values of the full and the
            sliced matrix, relative to the mean singular value, averaged over the matrices), ``"energy"``
            (fraction of ``sum sigma^2 = ||W||_F^2`` retained, averaged over the matrices).
        matrices: ``(M, n, d)`` float32 neuron-row matrices of the layer (``adapter.neuron_matrices``).
        grams: ``(M, d, d)`` their Gram matrices; ``full``: ``(M, d)`` their ascending singular values.
        keep: ``(k,)`` kept rows.
    """
    if reward == "energy":
        return float((matrices[:, keep].pow(2).sum((1, 2)) / matrices.pow(2).sum((1, 2))).mean())
    use = slice(0, 1) if reward == "ks" else slice(None)
    kept = _spectra(matrices[use], grams[use], keep)
    ref = full[use][:, full.shape[1] - kept.shape[1] :]
    if reward in ("ks", "ks3"):
        return float(reward_from_ks(ks_statistic(ref, kept)).mean())
    if reward == "w1":
        # Equal sample sizes: W1 of two empirical distributions is the mean gap of the sorted samples.
        w1 = (ref - kept).abs().mean(1) / ref.mean(1)
        return float((1.0 / w1.clamp_min(1e-12)).mean())
    raise ValueError(f"unknown reward {reward!r}; choose one of {', '.join(REWARDS)}")


@dataclass
class LayerData:
    """What the weight-only objectives need per layer, computed once: ``matrices`` ``(M, n, d)``,
    ``grams`` ``(M, d, d)`` and ascending singular values ``full`` ``(M, d)``."""

    matrices: torch.Tensor
    grams: torch.Tensor
    full: torch.Tensor

    @classmethod
    def of(cls, matrices: Sequence[torch.Tensor]) -> LayerData:
        m = torch.stack([w.detach().float().cpu() for w in matrices])
        grams = m.mT @ m
        return cls(m, grams, spectra_from_gram(grams, min(m.shape[1], m.shape[2])))

    def objective(self, reward: str, keep: torch.Tensor) -> float:
        return layer_objective(reward, self.matrices, self.grams, self.full, keep)


def train_variant(
    layers: Sequence[LayerData],
    k: int,
    *,
    reward: str = "ks",
    inputs: str = "gate",
    baseline: bool = False,
    episodes: int = 20,
    seed: int = 0,
    lr: float = 1e-3,
    gamma: float = 0.99,
) -> list[torch.Tensor]:
    """Train a policy with a variant reward / input / baseline; return its per-layer keep logits ``(n,)``.

    The loop is the paper's (one AdamW step per layer, ``gamma^i``-discounted reward, gradients clipped at
    1, the policy of the best episode kept) with three switches:

    * ``reward``: see :func:`layer_objective`.
    * ``inputs``: ``"gate"`` (the paper: the first in-projection's rows, ``(n, d)``) or ``"concat"`` (each
      neuron's gate, up and down rows side by side, ``(n, M d)``: the policy sees what the neuron reads
      *and* writes).
    * ``baseline``: REINFORCE with a per-layer baseline (the running mean of that layer's reward) and the
      advantage divided by the running standard deviation (Williams 1992; normalised advantages as in
      PPO implementations). Without it every sampled selection is reinforced in proportion to ``1/D``,
      which is always positive: the gradient only says "more of what you did".
    """
    feats = [ld.matrices[0] if inputs == "gate" else ld.matrices.permute(1, 0, 2).reshape(ld.matrices.shape[1], -1)
             for ld in layers]  # fmt: skip
    n, dim = feats[0].shape
    policy = make_policy(dim, n, seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    mean = torch.zeros(len(layers), dtype=torch.float64)
    var = torch.ones(len(layers), dtype=torch.float64)
    best, best_total = copy.deepcopy(policy.state_dict()), float("-inf")
    for episode in range(episodes):
        with torch.no_grad():
            keeps = [select_rows(policy.logits(x), k, "sample", generator) for x in feats]
        rewards = torch.tensor([ld.objective(reward, keep) for ld, keep in zip(layers, keeps, strict=True)])
        total = float((gamma ** torch.arange(len(layers)) * rewards).sum())
        if total > best_total:
            best, best_total = copy.deepcopy(policy.state_dict()), total
        if baseline:
            if episode == 0:
                mean, var = rewards.clone(), torch.ones_like(rewards) * rewards.var().clamp_min(1e-12)
            advantage = (rewards - mean) / var.sqrt().clamp_min(1e-12)
            delta = rewards - mean
            mean, var = mean + 0.2 * delta, 0.8 * (var + 0.2 * delta**2)
        else:
            advantage = rewards
        for i, (x, keep) in enumerate(zip(feats, keeps, strict=True)):
            optimizer.zero_grad(set_to_none=True)
            loss = -(gamma**i) * float(advantage[i]) * kept_log_prob(policy.logits(x), keep)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
    policy.load_state_dict(best)
    with torch.no_grad():
        return [policy.logits(x) for x in feats]
