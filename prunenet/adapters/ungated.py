"""Decoders with an ungated two-layer MLP on Llama's block layout.

* Apertus and Arcee: ``down_proj(act(up_proj(x)))`` (xIELU and ReLU² activations; Apertus's
  activation has two scalar parameters, which are not neuron-indexed and stay as they are).
* StarCoder2: ``c_proj(act(c_fc(x)))``, both ``nn.Linear`` with biases (``use_bias``).
"""

from .base import AttentionSpec, ModelAdapter, two_layer_mlp_tensors
from .llama import LLAMA_ATTENTION


class UpDownMLPAdapter(ModelAdapter):
    model_types = ("apertus", "arcee")
    layers_path = "model.layers"
    width_attr = "intermediate_size"
    tensors = two_layer_mlp_tensors("mlp.up_proj", "mlp.down_proj")
    attention_modules = LLAMA_ATTENTION
    attention = AttentionSpec()


class StarCoder2Adapter(UpDownMLPAdapter):
    model_types = ("starcoder2",)
    tensors = two_layer_mlp_tensors("mlp.c_fc", "mlp.c_proj")
