"""OPT: ``fc1``/``fc2`` directly on the decoder layer, biases, width in ``config.ffn_dim``."""

from .base import ModelAdapter, two_layer_mlp_tensors


class OPTAdapter(ModelAdapter):
    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    width_attr = "ffn_dim"
    tensors = two_layer_mlp_tensors("fc1", "fc2")
    attention_modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
