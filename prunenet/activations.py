"""FFN activation statistics: one forward pass over probe ids, per-unit sums of the out-projections' inputs.

A forward pre-hook on each block's out-projection (wherever the adapter says it is) reads the FFN
activations ``h``, its input; a mixture-of-experts block's hook recomputes each expert's activations through
its adapter (:meth:`prunenet.adapters.moe.MoEAdapter.expert_activations`), on the tokens routed to it. Only
two ``(n,)`` float64 sums per unit are kept, so memory does not grow with the probe budget.

Shapes: ``n`` FFN width, ``d`` hidden size, ``L`` layers, ``U`` units (``L``, or ``L * E`` with ``E`` experts
per block), ``B x T`` probe tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .adapters import ModelAdapter, get_adapter
from .validate import check_finite


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


def out_module(model: torch.nn.Module, adapter: ModelAdapter, layer: int) -> torch.nn.Module:
    """The module owning block ``layer``'s out-projection weight; its input is the ``(..., n)`` activations
    (a fused experts module's: the hidden states and the routing)."""
    name = adapter.block_prefix(layer) + adapter.out_projection.name
    return model.get_submodule(name.rpartition(".")[0])


def _neuron_norms(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """``(n,)`` float64 CPU norms of the out-projection entries each neuron feeds (neurons on ``axis``)."""
    return (weight if axis == 0 else weight.t()).double().norm(dim=1).cpu()


def _dense_stats_hook(stats: ActivationStats, unit: int, axis: int):
    """A forward pre-hook on a dense out-projection: its input ``(..., n)`` summed into unit ``unit``; the
    norms of its weight (neurons on ``axis``) read on the first call."""

    def hook(module, args):
        h = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
        stats.sum_sq[unit] += (h * h).sum(0)
        stats.total[unit] += h.sum(0)
        stats.tokens[unit] += h.shape[0]
        if not stats.out_norms[unit].any():
            stats.out_norms[unit] = _neuron_norms(resident_weight(module), axis)

    return hook


def _expert_stats_hook(stats: ActivationStats, first_unit: int, adapter: ModelAdapter):
    """A forward pre-hook on a fused experts module, ``forward(hidden (T, d), top_k_index (T, K), top_k_weights
    (T, K))``: for each expert, its activations (``adapter.expert_activations``) on its routed tokens, scaled by
    their routing weights, summed into units ``first_unit + e``. Recomputes what the experts compute (one more
    pass over the block's expert FFNs): the fused forward exposes no intermediate."""
    spec = adapter.out_projection
    out_name = spec.name.rpartition(".")[2]  # the out-projection's attribute of the experts module

    def hook(module, args):
        hidden, index, weights = (a.detach() for a in args[:3])
        weight = functools.cache(functools.partial(resident_weight, module))  # each parameter read once a call
        out = weight(out_name)  # (E, d, n)
        for e in range(out.shape[0]):
            unit = first_unit + e
            if not stats.out_norms[unit].any():
                stats.out_norms[unit] = _neuron_norms(out[e], spec.axis)
            token, slot = torch.where(index == e)
            if token.numel() == 0:
                continue
            h = adapter.expert_activations(module, e, hidden[token], weight)
            h = (h * weights[token, slot, None]).double().cpu()
            stats.sum_sq[unit] += (h * h).sum(0)
            stats.total[unit] += h.sum(0)
            stats.tokens[unit] += token.numel()

    return hook


@torch.no_grad()
def activation_stats(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8) -> ActivationStats:
    """Run ``model`` on probe ids ``(B, T)`` and collect :class:`ActivationStats` of every FFN.

    A forward pre-hook on each out-projection reads its input ``(batch, T, n)``. Only the base model
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
    if adapter.experts_attr is None:
        hooks = [_dense_stats_hook(stats, i, adapter.out_projection.axis) for i in range(layers)]
    else:
        hooks = [_expert_stats_hook(stats, i * experts, adapter) for i in range(layers)]
    handles = [out_module(model, adapter, i).register_forward_pre_hook(hook) for i, hook in enumerate(hooks)]
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
