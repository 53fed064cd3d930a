"""Falcon: ``dense_h_to_4h``/``dense_4h_to_h``, optional biases, width in ``config.ffn_hidden_size``."""

from .base import ModelAdapter, two_layer_mlp_tensors


class FalconAdapter(ModelAdapter):
    model_types = ("falcon",)
    layers_path = "transformer.h"
    width_attr = "ffn_hidden_size"
    tensors = two_layer_mlp_tensors("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    attention_modules = ("self_attention.query_key_value", "self_attention.dense")

    def ffn_width(self, config) -> int:
        # Older Falcon configs have no ffn_hidden_size; the model then uses 4 * hidden_size.
        if getattr(config, "ffn_hidden_size", None) is None:
            return 4 * self.hidden_size(config)
        return self.config_size(config, "ffn_hidden_size")
