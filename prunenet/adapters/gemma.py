"""Gemma 1/2/3 (text) decoders: the same gated MLP layout as Llama (GeGLU activation)."""

from .base import ModelAdapter, gated_mlp_tensors


class GemmaAdapter(ModelAdapter):
    model_types = ("gemma", "gemma2", "gemma3_text")
    layers_path = "model.layers"
    width_attr = "intermediate_size"
    tensors = gated_mlp_tensors()
