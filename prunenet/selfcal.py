"""Self-calibration (``--method selfcal``): score FFN neurons on text the model generates itself.

The model is run forward on probe sequences *it generates itself* from its BOS token -- never a dataset --
and each neuron is scored by its contribution to the FFN output, in the manner of Wanda (Sun et al. 2023,
arXiv 2306.11695: ``|W| * ||x||``) and of FLAP's fluctuation metric (An et al. 2024, arXiv 2312.11983:
``Var(x_j) * ||W_:,j||^2``). It is calibration *data*-free, not forward-free: the name says so. Uniformly
random token ids (``probe="random"``) and the FLAP score are the variants the selection study measured
(``benchmarks/selection_study.py``); the shipped method uses generated probes and the Wanda score.

The answer per FFN unit (a block, or one expert of a mixture-of-experts block, scored on the tokens routed
to it) is a sorted, unique ``(k,)`` int64 CPU vector of the neurons to keep.

Shapes: ``n`` FFN width, ``d`` hidden size, ``k`` kept neurons per unit, ``L`` layers, ``U`` units (``L``, or
``L * E`` with ``E`` experts per block), ``B x T`` probe tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .adapters import ModelAdapter, get_adapter
from .compat import forward_with_cache
from .progress import progress_bar
from .validate import check_finite

PROBES = ("generate", "random")
SCORES = ("wanda", "flap")


# ----------------------------------------------------------------------------------------------------------------
# The FFN's neuron-indexed matrices, family-agnostic (through the adapter's declarative tensor list)


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
    name = adapter.block_prefix(layer) + adapter.out_projection.name
    return model.get_submodule(name.rsplit(".", 1)[0])


# ----------------------------------------------------------------------------------------------------------------
# Probes from the model itself, activation statistics, neuron scores


def start_token(model: torch.nn.Module) -> int:
    """The token generation starts from: the (language model's) config's BOS, else EOS (a document
    boundary), else 0."""
    config = get_adapter(model.config).text_config(model.config)
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(config, attr, None)
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
    progress: bool = False,
) -> torch.Tensor:
    """Probe token ids ``(sequences, length)`` int64 produced without any dataset (``length`` capped at the
    model's maximum positions).

    ``"generate"``: ancestral sampling from the model itself, starting at :func:`start_token`, with a
    seeded ``torch.Generator`` (deterministic on a given machine; the global RNG is not touched).
    Sampling at temperature 1 rather than greedy decoding: greedy text from a small base model loops on
    one phrase, which would excite only the few neurons of that phrase.
    ``"random"``: uniformly random ids (the cheapest probe; off the model's input distribution).
    ``progress``: a progress bar over the decoding steps.
    """
    if kind not in PROBES:
        raise ValueError(f"unknown probe kind {kind!r}; choose one of {', '.join(PROBES)}")
    device = model.get_input_embeddings().weight.device  # where the ids go (offloaded blocks are elsewhere)
    generator = torch.Generator().manual_seed(seed)
    length = get_adapter(model.config).capped_length(model.config, length)
    vocab = model.get_output_embeddings().weight.shape[0]
    if kind == "random":
        return torch.randint(vocab, (sequences, length), generator=generator).to(device)
    prefix = torch.full((sequences, 1), start_token(model), dtype=torch.long, device=device)
    return sample(model, prefix, length, generator, temperature=temperature, progress=progress)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prefix: torch.Tensor,
    length: int,
    generator: torch.Generator,
    *,
    temperature: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Continue ``prefix`` ``(B, t)`` by ancestral sampling (KV cache, ``generator`` on the CPU) to ``(B, length)``."""
    was_training = model.training
    model.eval()
    ids, cache, step_ids = prefix, None, prefix
    for _ in progress_bar(range(length - prefix.shape[1]), desc="generating", unit="token", enabled=progress):
        logits, cache = forward_with_cache(model, step_ids, cache)
        probs = torch.softmax(logits[:, -1].float().cpu() / temperature, dim=-1)
        check_finite(probs, "the model's next-token probabilities on its own text")
        step_ids = torch.multinomial(probs, 1, generator=generator).to(prefix.device)
        ids = torch.cat([ids, step_ids], dim=1)
    model.train(was_training)
    return ids


@dataclass
class ActivationStats:
    """Per-unit statistics of the FFN activations ``h`` (the out-projection's input) over probe tokens.

    A unit is a block's FFN, or one expert of a mixture-of-experts block (``U = L * E`` units), whose
    activations are its routed tokens' scaled by their routing weights: what it adds to the block's output.

    Attributes:
        sum_sq: ``(U, n)`` float64 ``sum_t h_tj^2``.
        total: ``(U, n)`` float64 ``sum_t h_tj``.
        tokens: ``(U, 1)`` float64: the tokens ``t`` each unit's sums run over (every probe token for a dense
            FFN; the tokens routed to an expert).
        out_norms: ``(U, n)`` float64 ``||W_out[:, j]||_2``, the norm of the out-projection column each
            neuron feeds, read while the block's weights were resident (an offloaded block's are only then).
    """

    sum_sq: torch.Tensor
    total: torch.Tensor
    tokens: torch.Tensor
    out_norms: torch.Tensor

    def mean_square(self) -> torch.Tensor:
        """``(U, n)``: ``E[h^2]`` (0 for an expert no probe token was routed to)."""
        return self.sum_sq / self.tokens.clamp_min(1)

    def variance(self) -> torch.Tensor:
        """``(U, n)``: ``Var(h)`` over tokens (population variance)."""
        mean = self.total / self.tokens.clamp_min(1)
        return (self.mean_square() - mean**2).clamp_min(0)


def resident_weight(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """``module.<name>``, also when accelerate has offloaded it: its hook loads the weight only inside the
    module's own forward, after the pre-hooks have run, so read it from the hook's weights map then."""
    weight = getattr(module, name).detach()
    hook = getattr(module, "_hf_hook", None)
    if weight.is_meta and getattr(hook, "weights_map", None) is not None:
        weight = hook.weights_map[name]
    return weight


def _expert_stats_hook(stats: ActivationStats, first_unit: int):
    """A forward pre-hook on a fused experts module, ``forward(hidden (T, d), top_k_index (T, K), top_k_weights
    (T, K))``: for each expert, its activations ``act(gate x) * (up x)`` on its routed tokens, scaled by their
    routing weights, summed into units ``first_unit + e``. Recomputes what the experts compute (one more
    pass over the block's expert FFNs): the fused forward exposes no intermediate."""

    def hook(module, args):
        hidden, index, weights = (a.detach() for a in args[:3])
        gate_up = resident_weight(module, "gate_up_proj")  # (E, 2n, d)
        down = resident_weight(module, "down_proj")  # (E, d, n)
        for e in range(gate_up.shape[0]):
            unit = first_unit + e
            if not stats.out_norms[unit].any():
                stats.out_norms[unit] = down[e].double().norm(dim=0).cpu()
            token, slot = torch.where(index == e)
            if token.numel() == 0:
                continue
            gate, up = torch.nn.functional.linear(hidden[token], gate_up[e]).chunk(2, dim=-1)
            h = (module.act_fn(gate) * up * weights[token, slot, None]).double().cpu()
            stats.sum_sq[unit] += (h * h).sum(0)
            stats.total[unit] += h.sum(0)
            stats.tokens[unit] += token.numel()

    return hook


@torch.no_grad()
def activation_stats(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8) -> ActivationStats:
    """Run ``model`` on probe ids ``(B, T)`` and collect :class:`ActivationStats` of every FFN.

    A forward pre-hook on each out-projection reads its input ``(batch, T, n)``; nothing is stored but two
    ``(n,)`` float64 sums per unit, so memory does not grow with the probe budget. Only the base model
    runs (no LM head): the statistics are the FFNs', and ``B x T x vocab`` logits would be most of the
    memory. ``model`` may have its blocks offloaded (:func:`prunenet.offload.offloaded_model`).
    """
    adapter = get_adapter(model.config)
    layers, width = adapter.num_layers(model.config), adapter.ffn_width(model.config)
    units, experts = adapter.num_units(model.config), adapter.num_experts(model.config)
    stats = ActivationStats(
        sum_sq=torch.zeros(units, width, dtype=torch.float64),
        total=torch.zeros(units, width, dtype=torch.float64),
        tokens=torch.zeros(units, 1, dtype=torch.float64),
        out_norms=torch.zeros(units, width, dtype=torch.float64),
    )
    seen = [False] * layers
    spec = adapter.out_projection

    def hook_for(layer: int):
        def hook(module, args):
            h = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
            stats.sum_sq[layer] += (h * h).sum(0)
            stats.total[layer] += h.sum(0)
            stats.tokens[layer] += h.shape[0]
            if not seen[layer]:
                weight = resident_weight(module)
                stats.out_norms[layer] = (weight if spec.axis == 0 else weight.t()).double().norm(dim=1).cpu()
                seen[layer] = True

        return hook

    if adapter.experts_attr is None:
        handles = [_out_module(model, adapter, i).register_forward_pre_hook(hook_for(i)) for i in range(layers)]
    else:
        handles = [
            _out_module(model, adapter, i).register_forward_pre_hook(_expert_stats_hook(stats, i * experts))
            for i in range(layers)
        ]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, ids.shape[0], batch_size):
            model.base_model(input_ids=ids[start : start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    check_finite(stats.sum_sq, "the FFN activations on the probes")
    check_finite(stats.out_norms, "the FFN out-projections")
    return stats


def neuron_scores(stats: ActivationStats, score: str = "wanda") -> torch.Tensor:
    """``(U, n)`` float64 importance of every FFN neuron of every unit; higher is kept first.

    * ``"wanda"``: ``sqrt(E[h_j^2]) * ||W_out[:, j]||_2`` -- the RMS size of neuron ``j``'s contribution to
      the FFN output (Wanda's ``|W| * ||x||``, summed over the column it feeds: structured Wanda).
    * ``"flap"``: ``Var(h_j) * ||W_out[:, j]||_2^2`` -- FLAP's fluctuation: how much the output would move
      if neuron ``j`` were replaced by its mean (FLAP then adds that mean to a bias; the models we must
      reload with stock ``transformers`` have no such bias, so we do not compensate).
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
    sequences: int = 8,
    length: int = 128,
    timings: dict[str, float] | None = None,
) -> list[torch.Tensor]:
    """The ``selfcal`` method: kept neurons per FFN unit (sorted ``(k,)`` int64 CPU) from self-generated probes.

    ``seed`` fixes the probe sequences, hence the result. ``model`` may have its blocks offloaded
    (:mod:`prunenet.offload`). ``timings``, when given, receives the seconds of the two phases:
    ``probe_s`` (generating ``sequences x length`` tokens, one decoding step per token) and ``stats_s``
    (one forward pass over them). Measured costs: docs/methods.md and docs/large-models.md.
    """
    timings = {} if timings is None else timings
    tick = time.perf_counter()
    ids = self_probes(model, kind=probe, sequences=sequences, length=length, seed=seed)
    timings["probe_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    stats = activation_stats(model, ids)
    timings["stats_s"] = time.perf_counter() - tick
    return [top_k(layer_scores, k).cpu() for layer_scores in neuron_scores(stats, score)]
