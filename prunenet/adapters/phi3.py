"""Phi-3: a gated MLP whose gate and up projections are fused into one ``gate_up_proj`` of shape ``(2n, d)``.

``Phi3MLP`` splits the projection with ``chunk(2)``: rows ``0..n-1`` are the gate, rows ``n..2n-1``
the up projection, so neuron ``j`` owns rows ``j`` and ``n + j`` and both move together.
"""

from .base import ModelAdapter, fused_gated_mlp_tensors


class Phi3Adapter(ModelAdapter):
    model_types = ("phi3",)
    layers_path = "model.layers"
    width_attr = "intermediate_size"
    tensors = fused_gated_mlp_tensors()
    attention_modules = ("self_attn.qkv_proj", "self_attn.o_proj")
