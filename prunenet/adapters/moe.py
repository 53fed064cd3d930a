"""Mixture-of-experts blocks whose routed experts all have one width: Mixtral, Qwen3-MoE, OLMoE, GraniteMoE.

In memory ``transformers`` fuses each block's experts into two 3-D parameters: ``gate_up_proj``
``(E, 2n, d)`` (expert ``e``'s gate rows, then its up rows) and ``down_proj`` ``(E, d, n)``. Each expert is
one FFN unit keeping its own ``k`` neurons; every expert keeps the same ``k``, so the expert width in the
config describes the result and a stock reload builds it. The router (``gate``) is untouched: it scores
experts from the block's input, which has no neuron axis.

Checkpoints store the experts as ``transformers`` saves them: one tensor per expert for Mixtral
(``w1``/``w3``/``w2``), Qwen3-MoE and OLMoE (``gate_proj``/``up_proj``/``down_proj``); GraniteMoE keeps its
fused ``input_linear`` ``(E, 2n, d)`` and ``output_linear`` ``(E, d, n)``.
"""

from collections.abc import Callable

import torch

from .base import AttentionSpec, ModelAdapter, NeuronTensor
from .llama import LLAMA_ATTENTION

GATE_UP, DOWN = "gate_up_proj", "down_proj"
"""The fused experts module's parameters: ``(E, 2n, d)`` (expert ``e``'s gate rows, then its up rows), ``(E, d, n)``."""


def fused_experts(prefix: str) -> tuple[NeuronTensor, ...]:
    """The fused expert parameters of a block, as the module holds them."""
    return (
        NeuronTensor(f"{prefix}.{GATE_UP}", axis=0, groups=2, experts=True),
        NeuronTensor(f"{prefix}.{DOWN}", axis=1, role="out", experts=True),
    )


def per_expert(prefix: str, gate: str, up: str, down: str) -> tuple[NeuronTensor, ...]:
    """Checkpoint tensors of one expert each, ``{expert}`` standing for its index."""
    return (
        NeuronTensor(f"{prefix}.{{expert}}.{gate}.weight", axis=0),
        NeuronTensor(f"{prefix}.{{expert}}.{up}.weight", axis=0),
        NeuronTensor(f"{prefix}.{{expert}}.{down}.weight", axis=1, role="out"),
    )


class MoEAdapter(ModelAdapter):
    layers_path = "model.layers"
    attention_modules = LLAMA_ATTENTION
    attention = AttentionSpec()
    width_multiple = 8

    def record_sliced_shapes(self, model: torch.nn.Module, layer: int, width: int) -> None:
        # transformers' fused experts module records its width, which its forward reads.
        experts = model.get_submodule(self.block_prefix(layer) + self.tensors[0].name.rpartition(".")[0])
        if hasattr(experts, "intermediate_dim"):
            experts.intermediate_dim = width

    def expert_activations(
        self,
        experts: torch.nn.Module,
        expert: int,
        hidden: torch.Tensor,
        weight: Callable[[str], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Expert ``expert``'s FFN activations ``(T_e, n)``, ``act(gate x) * (up x)`` -- the input of its
        out-projection, before the routing weight scales its output -- on the hidden states ``hidden``
        ``(T_e, d)`` of the tokens routed to it. The fused forward computes them and exposes no intermediate:
        this recomputes them as it does.

        Args:
            experts: a block's fused experts module (it holds the ``tensors`` and the activation ``act_fn``).
            weight: reads one of its parameters by attribute name (default: the parameter itself); a caller
                whose module is offloaded passes one that finds the weight where it is resident.
        """
        read = weight or (lambda name: getattr(experts, name).detach())
        gate, up = torch.nn.functional.linear(hidden, read(GATE_UP)[expert]).chunk(2, dim=-1)
        return experts.act_fn(gate) * up


class MixtralAdapter(MoEAdapter):
    model_types = ("mixtral",)
    width_attr = "intermediate_size"
    experts_attr = "num_local_experts"
    tensors = fused_experts("mlp.experts")
    checkpoint_tensors = per_expert("block_sparse_moe.experts", "w1", "w3", "w2")


class Qwen3MoeAdapter(MoEAdapter):
    model_types = ("qwen3_moe",)
    width_attr = "moe_intermediate_size"
    experts_attr = "num_experts"
    tensors = fused_experts("mlp.experts")
    checkpoint_tensors = per_expert("mlp.experts", "gate_proj", "up_proj", "down_proj")

    def check_config(self, config) -> None:
        if list(getattr(config, "mlp_only_layers", None) or []) or int(getattr(config, "decoder_sparse_step", 1)) != 1:
            raise ValueError(
                "this qwen3_moe config has dense MLP blocks (mlp_only_layers / decoder_sparse_step), whose width "
                "(intermediate_size) differs from the experts'; PruneNet prunes models whose blocks are all experts"
            )


class OlmoeAdapter(MoEAdapter):
    model_types = ("olmoe",)
    width_attr = "intermediate_size"
    experts_attr = "num_experts"
    tensors = fused_experts("mlp.experts")
    checkpoint_tensors = per_expert("mlp.experts", "gate_proj", "up_proj", "down_proj")
    # OLMoE's q_norm/k_norm normalise over all heads together: removing heads would change them.
    attention = None


class GraniteMoeAdapter(MoEAdapter):
    model_types = ("granitemoe",)
    width_attr = "intermediate_size"
    experts_attr = "num_local_experts"
    tensors = fused_experts("block_sparse_moe.experts")
    checkpoint_tensors = (
        NeuronTensor("block_sparse_moe.input_linear.weight", axis=0, groups=2, experts=True),
        NeuronTensor("block_sparse_moe.output_linear.weight", axis=1, role="out", experts=True),
    )
