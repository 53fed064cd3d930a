"""Gemma 1/2/3 (text) decoders: the same gated MLP layout as Llama (GeGLU activation)."""

from .base import AttentionSpec, ModelAdapter, gated_mlp_tensors


class GemmaAdapter(ModelAdapter):
    model_types = ("gemma", "gemma2", "gemma3_text")
    layers_path = "model.layers"
    width_attr = "intermediate_size"
    tensors = gated_mlp_tensors()
    attention_modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    attention = AttentionSpec()
