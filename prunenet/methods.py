"""Neuron-selection methods beyond the paper's policy (issue 9), and the research variants behind them.

Every method answers one question per transformer block: which ``k`` of the ``n`` FFN neurons to keep.
The answer is a sorted, unique ``(k,)`` int64 CPU vector per layer, as
:func:`prunenet.pipeline.choose_keeps` returns it. Two families:

* **weight-only** (no forward pass, no text): REINFORCE variants of the paper's policy with other
  rewards (KS on the spectra of gate, up *and* down; Wasserstein-1 between spectra; retained energy),
  a per-layer baseline with normalised advantages, and richer policy inputs (the concatenated
  gate/up/down rows of each neuron). :func:`train_variant` trains them; ``benchmarks/selection_study.py``
  measures them. The paper's own method is untouched: it lives in :mod:`prunenet.train`.
* **self-calibration** (``selfcal``, shipped as ``prunenet compress --method selfcal``): the model is run
  forward on probe sequences *it generates itself* from its BOS token (or, as a variant, on uniformly
  random token ids) -- never a dataset -- and each neuron is scored by its contribution to the FFN
  output, in the manner of Wanda (Sun et al. 2023, arXiv 2306.11695: ``|W| * ||x||``) and of FLAP's
  fluctuation metric (An et al. 2024, arXiv 2312.11983: ``Var(x_j) * ||W_:,j||^2``). It is calibration
  *data*-free, not forward-free: the name says so.

Optionally, detected outlier ("super weight", Yu et al. 2024, arXiv 2411.07191) neurons are always kept
(:func:`super_weight_neurons`); the study measures whether that helps.

Shapes: ``n`` FFN width, ``d`` hidden size, ``k`` kept neurons per layer, ``L`` layers, ``B x T`` probe tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .adapters import get_adapter
from .adapters.base import ModelAdapter
from .policy import kept_log_prob, select_rows
from .reward import ks_statistic, reward_from_ks, spectra_from_gram
from .train import make_policy

# Shipped methods (choices of `prunenet compress --method`) implemented here, beside the paper's in pipeline.py.
SHIPPED = ("selfcal",)
PROBES = ("generate", "random")
SCORES = ("wanda", "flap")
REWARDS = ("ks", "ks3", "w1", "energy")


# ----------------------------------------------------------------------------------------------------------------
# The FFN's neuron-indexed matrices, family-agnostic (through the adapter's declarative tensor list)


def out_projection(adapter: ModelAdapter):
    """The :class:`~prunenet.adapters.base.NeuronTensor` of the out-projection weight.

    It is the first weight whose neuron axis differs from the first in-projection's: ``down_proj`` /
    ``fc2`` (neurons on axis 1), or GPT-2's transposed ``c_proj`` (axis 0).
    """
    first = adapter.tensors[0]
    for spec in adapter.tensors:
        if spec.name.endswith("weight") and spec.axis != first.axis:
            return spec
    raise ValueError(f"{type(adapter).__name__} declares no out-projection weight")


def neuron_matrices(model: torch.nn.Module, adapter: ModelAdapter, layer: int) -> list[torch.Tensor]:
    """Every FFN weight of block ``layer`` as neuron-row matrices: a list of ``(n, d)`` views.

    In-projections first (gate then up for gated MLPs; a fused ``(2n, d)`` tensor gives two), then the
    out-projection's columns as rows. Views of the model's weights (transposed where needed): read only.
    """
    width = adapter.ffn_width(model.config)
    out = []
    for spec, param in adapter.neuron_parameters(model, layer):
        if not spec.name.endswith("weight"):
            continue
        w = param.detach() if spec.axis == 0 else param.detach().t()
        out.extend(w[g * width : (g + 1) * width] for g in range(spec.groups))
    return out


def _out_module(model: torch.nn.Module, adapter: ModelAdapter, layer: int) -> torch.nn.Module:
    """The module owning block ``layer``'s out-projection weight; its input is the ``(..., n)`` activations."""
    name = adapter.block_prefix(layer) + out_projection(adapter).name
    return model.get_submodule(name.rsplit(".", 1)[0])


# ----------------------------------------------------------------------------------------------------------------
# Self-calibration: probes from the model itself, activation statistics, neuron scores


def start_token(model: torch.nn.Module) -> int:
    """The token generation starts from: the config's BOS, else EOS (a document boundary), else 0."""
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(model.config, attr, None)
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


@torch.no_grad()
def self_probes(
    model: torch.nn.Module,
    *,
    kind: str = "generate",
    sequences: int = 8,
    length: int = 128,
    seed: int = 0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Probe token ids ``(sequences, length)`` int64 produced without any dataset (``length`` capped at the
    model's maximum positions).

    ``"generate"``: ancestral sampling from the model itself, starting at :func:`start_token`, with a
    seeded ``torch.Generator`` (deterministic on a given machine; the global RNG is not touched).
    Sampling at temperature 1 rather than greedy decoding: greedy text from a small base model loops on
    one phrase, which would excite only the few neurons of that phrase.
    ``"random"``: uniformly random ids (the cheapest probe; off the model's input distribution).
    """
    if kind not in PROBES:
        raise ValueError(f"unknown probe kind {kind!r}; choose one of {', '.join(PROBES)}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    # Never past the model's position table (GPT-2-style learned positions fail with an IndexError beyond it).
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    length = min(length, int(limit)) if limit else length
    vocab = model.get_output_embeddings().weight.shape[0]
    if kind == "random":
        return torch.randint(vocab, (sequences, length), generator=generator).to(device)
    was_training = model.training
    model.eval()
    ids = torch.full((sequences, 1), start_token(model), dtype=torch.long, device=device)
    past, step_ids = None, ids
    for _ in range(length - 1):
        out = model(input_ids=step_ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        probs = torch.softmax(out.logits[:, -1].float().cpu() / temperature, dim=-1)
        step_ids = torch.multinomial(probs, 1, generator=generator).to(device)
        ids = torch.cat([ids, step_ids], dim=1)
    model.train(was_training)
    return ids


@dataclass
class ActivationStats:
    """Per-layer statistics of the FFN activations ``h`` (the out-projection's input) over probe tokens.

    Attributes:
        sum_sq: ``(L, n)`` float64 ``sum_t h_tj^2``.
        total: ``(L, n)`` float64 ``sum_t h_tj``.
        tokens: number of tokens ``t`` summed over.
    """

    sum_sq: torch.Tensor
    total: torch.Tensor
    tokens: int

    def mean_square(self) -> torch.Tensor:
        """``(L, n)``: ``E[h^2]``."""
        return self.sum_sq / self.tokens

    def variance(self) -> torch.Tensor:
        """``(L, n)``: ``Var(h)`` over tokens (population variance)."""
        mean = self.total / self.tokens
        return (self.mean_square() - mean**2).clamp_min(0)


@torch.no_grad()
def activation_stats(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8) -> ActivationStats:
    """Run ``model`` on probe ids ``(B, T)`` and collect :class:`ActivationStats` of every FFN.

    A forward pre-hook on each out-projection reads its input ``(batch, T, n)``; nothing is stored but two
    ``(n,)`` float64 sums per layer, so memory does not grow with the probe budget.
    """
    adapter = get_adapter(model.config)
    layers, width = adapter.num_layers(model.config), adapter.ffn_width(model.config)
    sum_sq = torch.zeros(layers, width, dtype=torch.float64)
    total = torch.zeros(layers, width, dtype=torch.float64)

    def hook_for(layer: int):
        def hook(_module, args):
            h = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
            sum_sq[layer] += (h * h).sum(0)
            total[layer] += h.sum(0)

        return hook

    handles = [_out_module(model, adapter, i).register_forward_pre_hook(hook_for(i)) for i in range(layers)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start : start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return ActivationStats(sum_sq=sum_sq, total=total, tokens=ids.numel())


def neuron_scores(model: torch.nn.Module, stats: ActivationStats, score: str = "wanda") -> torch.Tensor:
    """``(L, n)`` float64 importance of every FFN neuron; higher is kept first.

    * ``"wanda"``: ``sqrt(E[h_j^2]) * ||W_out[:, j]||_2`` -- the RMS size of neuron ``j``'s contribution to
      the FFN output (Wanda's ``|W| * ||x||``, summed over the column it feeds: structured Wanda).
    * ``"flap"``: ``Var(h_j) * ||W_out[:, j]||_2^2`` -- FLAP's fluctuation: how much the output would move
      if neuron ``j`` were replaced by its mean (FLAP then adds that mean to a bias; the models we must
      reload with stock ``transformers`` have no such bias, so we do not compensate).
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    adapter = get_adapter(model.config)
    norms = torch.stack(
        [
            neuron_matrices(model, adapter, i)[-1].double().norm(dim=1).cpu()
            for i in range(adapter.num_layers(model.config))
        ]
    )  # (L, n): norms of the out-projection columns
    if score == "wanda":
        return stats.mean_square().sqrt() * norms
    return stats.variance() * norms**2


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
    sequences: int = 8,
    length: int = 128,
    protect_super: bool = False,
) -> list[torch.Tensor]:
    """The ``selfcal`` method: kept neurons per layer (sorted ``(k,)`` int64) from self-generated probes.

    ``seed`` fixes the probe sequences, hence the result. Cost on SmolLM2-135M (2 CPU cores): generating
    8 x 128 tokens and one forward pass over them -- see the README for the measured time.
    """
    ids = self_probes(model, kind=probe, sequences=sequences, length=length, seed=seed)
    scores = neuron_scores(model, activation_stats(model, ids), score)
    adapter = get_adapter(model.config)
    keeps = []
    for layer in range(adapter.num_layers(model.config)):
        protect = super_weight_neurons(neuron_matrices(model, adapter, layer)) if protect_super else None
        keeps.append(top_k(scores[layer], k, protect))
    return keeps


# ----------------------------------------------------------------------------------------------------------------
# Outlier ("super weight") neurons


def super_weight_neurons(matrices: Sequence[torch.Tensor], factor: float = 20.0, limit: int = 8) -> torch.Tensor:
    """Neurons holding an outlier weight: ``(m,)`` int64, ``m <= limit``, sorted.

    Yu et al. (2024, arXiv 2411.07191) find a handful of scalar "super weights" in ``down_proj`` whose
    removal destroys a model; they locate them from activation spikes on one prompt. Without any input we
    use the weights alone: neuron ``j`` is an outlier when the largest ``|w|`` among its out-projection
    column exceeds ``factor`` times the median over neurons of that per-neuron maximum.

    Args:
        matrices: :func:`neuron_matrices` of one layer; the last is the out-projection ``(n, d)``.
    """
    peak = matrices[-1].detach().float().abs().amax(dim=1).cpu()  # (n,)
    candidates = torch.nonzero(peak > factor * peak.median()).squeeze(1)
    if candidates.numel() > limit:
        candidates = candidates[torch.topk(peak[candidates], limit).indices]
    return candidates.sort().values


# ----------------------------------------------------------------------------------------------------------------
# Weight-only policy variants (REINFORCE with other rewards, baselines and inputs)


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
        matrices: ``(M, n, d)`` float32 neuron-row matrices of the layer (:func:`neuron_matrices`).
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


# ----------------------------------------------------------------------------------------------------------------
# Dispatch for pipeline.choose_keeps


def choose(method: str, k: int, *, model: torch.nn.Module | None, seed: int = 0) -> list[torch.Tensor]:
    """Kept neurons per layer for a method of :data:`SHIPPED` (sorted ``(k,)`` int64 CPU vectors)."""
    if method == "selfcal":
        if model is None:
            raise ValueError(
                "--method selfcal runs the model forward, so it needs the model loaded in memory "
                "(it cannot run while streaming a checkpoint)"
            )
        return [keep.cpu() for keep in selfcal_keeps(model, k, seed=seed)]
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(SHIPPED)}")
