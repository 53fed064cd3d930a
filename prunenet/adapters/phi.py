"""Phi-1/1.5/2: a plain two-layer MLP ``fc2(gelu(fc1(x)))`` with biases."""

from .base import ModelAdapter, two_layer_mlp_tensors


class PhiAdapter(ModelAdapter):
    model_types = ("phi",)
    layers_path = "model.layers"
    width_attr = "intermediate_size"
    tensors = two_layer_mlp_tensors("mlp.fc1", "mlp.fc2")
    attention_modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense")
