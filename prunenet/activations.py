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


def dense_activations(args: tuple) -> torch.Tensor:
    """``(T, n)``: a dense out-projection's input (its forward pre-hook's ``args``), every token a row."""
    return args[0].detach().reshape(-1, args[0].shape[-1])


def routed_activations(module: torch.nn.Module, args: tuple, adapter: ModelAdapter, weight):
    """For each expert of a fused experts module that tokens were routed to: ``(e, h)``, ``h`` ``(T_e, n)`` its
    activations (``adapter.expert_activations``) on those tokens scaled by their routing weights -- what the
    expert adds to the block's output. ``args``: the module's ``forward(hidden (T, d), top_k_index (T, K),
    top_k_weights (T, K))``; ``weight``: reads one of its parameters by name (offloaded ones included).

    Recomputes what the experts compute (one more pass over the block's expert FFNs): the fused forward
    exposes no intermediate."""
    hidden, index, weights = (a.detach() for a in args[:3])
    for e in range(getattr(module, adapter.out_projection.name.rpartition(".")[2]).shape[0]):
        token, slot = torch.where(index == e)
        if token.numel():
            yield e, adapter.expert_activations(module, e, hidden[token], weight) * weights[token, slot, None]


def _dense_stats_hook(stats: ActivationStats, unit: int, axis: int):
    """A forward pre-hook on a dense out-projection: its input ``(..., n)`` summed into unit ``unit``; the
    norms of its weight (neurons on ``axis``) read on the first call."""

    def hook(module, args):
        h = dense_activations(args).double().cpu()
        stats.sum_sq[unit] += (h * h).sum(0)
        stats.total[unit] += h.sum(0)
        stats.tokens[unit] += h.shape[0]
        if not stats.out_norms[unit].any():
            stats.out_norms[unit] = _neuron_norms(resident_weight(module), axis)

    return hook


def _expert_stats_hook(stats: ActivationStats, first_unit: int, adapter: ModelAdapter):
    """A forward pre-hook on a fused experts module: each expert's routed activations
    (:func:`routed_activations`) summed into units ``first_unit + e``."""
    spec = adapter.out_projection
    out_name = spec.name.rpartition(".")[2]  # the out-projection's attribute of the experts module

    def hook(module, args):
        weight = functools.cache(functools.partial(resident_weight, module))  # each parameter read once a call
        out = weight(out_name)  # (E, d, n)
        for e in range(out.shape[0]):
            if not stats.out_norms[first_unit + e].any():
                stats.out_norms[first_unit + e] = _neuron_norms(out[e], spec.axis)
        for e, h in routed_activations(module, args, adapter, weight):
            h = h.double().cpu()
            stats.sum_sq[first_unit + e] += (h * h).sum(0)
            stats.total[first_unit + e] += h.sum(0)
            stats.tokens[first_unit + e] += h.shape[0]

    return hook


class _Stop(Exception):
    """Raised by the hook on the block after the last one a pass needs: the rest of the forward is skipped."""


def _stop(module, args):
    raise _Stop


def run_with_hooks(model: torch.nn.Module, adapter: ModelAdapter, ids: torch.Tensor, hooks: dict, batch_size: int = 8):
    """Run ``model``'s base model on ``ids`` ``(B, T)`` in batches of ``batch_size`` sequences, with forward
    pre-hooks ``hooks`` (``{layer: hook}``) on those layers' out-projection modules (:func:`out_module`).

    The forward stops before the block after the last hooked one: a pass for early layers does not run (nor,
    when offloaded, read) the later ones. Only the base model runs (no LM head): ``B x T x vocab`` logits
    would be most of the memory. ``model`` may have its blocks offloaded (:func:`prunenet.offload.offloaded_model`).
    """
    handles = [out_module(model, adapter, i).register_forward_pre_hook(hook) for i, hook in hooks.items()]
    after = max(hooks) + 1
    if after < adapter.num_layers(model.config):
        # A pre-hook runs before accelerate's (inside forward) would bring an offloaded block's weights in.
        handles.append(model.get_submodule(adapter.block_prefix(after)[:-1]).register_forward_pre_hook(_stop))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, ids.shape[0], batch_size):
            try:
                model.base_model(input_ids=ids[start : start + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


@torch.no_grad()
def activation_stats(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8) -> ActivationStats:
    """Run ``model`` on probe ids ``(B, T)`` and collect :class:`ActivationStats` of every FFN.

    A forward pre-hook on each out-projection reads its input ``(batch, T, n)`` (:func:`run_with_hooks`).
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
    run_with_hooks(model, adapter, ids, dict(enumerate(hooks)), batch_size)
    check_finite(stats.sum_sq, "the FFN activations on the probes")
    check_finite(stats.out_norms, "the FFN out-projections")
    return stats
