"""GPT-2: ``Conv1D`` layers store ``weight`` as ``(in, out)``, so ``c_fc.weight`` is ``(d, n)``.

The state matrix is therefore ``c_fc.weight.T``; ``c_proj.weight`` is ``(n, d)`` and loses rows.
``config.n_inner`` may be ``None``, meaning ``4 * n_embd``.
"""

import torch

from .base import ModelAdapter, two_layer_mlp_tensors


class GPT2Adapter(ModelAdapter):
    model_types = ("gpt2",)
    layers_path = "transformer.h"
    width_attr = "n_inner"
    tensors = two_layer_mlp_tensors("mlp.c_fc", "mlp.c_proj", transposed=True)
    attention_modules = ("attn.c_attn", "attn.c_proj")
    conv1d = True

    def num_layers(self, config) -> int:
        return self.config_size(config, "n_layer")

    def hidden_size(self, config) -> int:
        return self.config_size(config, "n_embd")

    def ffn_width(self, config) -> int:
        return self.config_size(config, "n_inner") if config.n_inner is not None else 4 * self.hidden_size(config)

    def record_weight_shape(self, module: torch.nn.Module, weight: torch.Tensor) -> None:
        module.nf = weight.shape[1]  # Conv1D's output width; its weight is (in, out)
