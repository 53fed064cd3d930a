"""GPT-NeoX / Pythia: ``dense_h_to_4h``/``dense_4h_to_h`` with biases."""

from .base import ModelAdapter, two_layer_mlp_tensors


class GPTNeoXAdapter(ModelAdapter):
    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"
    width_attr = "intermediate_size"
    tensors = two_layer_mlp_tensors("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    attention_modules = ("attention.query_key_value", "attention.dense")
