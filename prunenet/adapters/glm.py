"""GLM and GLM-4: a gated MLP whose gate and up projections are one ``gate_up_proj`` of shape ``(2n, d)``
(split with ``chunk(2)``, as Phi-3's), and Llama's separate q/k/v/o attention projections."""

from .base import AttentionSpec, ModelAdapter, fused_gated_mlp_tensors
from .llama import LLAMA_ATTENTION


class GlmAdapter(ModelAdapter):
    model_types = ("glm", "glm4")
    layers_path = "model.layers"
    width_attr = "intermediate_size"
    tensors = fused_gated_mlp_tensors()
    attention_modules = LLAMA_ATTENTION
    attention = AttentionSpec()
