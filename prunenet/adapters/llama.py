"""Llama-style decoders with a gated MLP (gate_proj, up_proj, down_proj): Llama, Mistral, Qwen2, Qwen3."""

from .base import AttentionSpec, ModelAdapter, gated_mlp_tensors


class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    layers_path = "model.layers"
    width_attr = "intermediate_size"
    tensors = gated_mlp_tensors()
    attention_modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    attention = AttentionSpec()
