"""Decoders with Llama's block layout: a gated MLP (``gate_proj``, ``up_proj``, ``down_proj``) under
``model.layers``, width in ``config.intermediate_size``.

Many newer families are this layout under another name. They differ in what attention slicing needs:
:class:`LlamaAdapter`'s families have separate q/k/v/o projections whose per-head norms (where any) are
shared by every head, so whole key/value groups can be removed; :class:`GatedMLPAdapter`'s normalise
queries and keys over all heads together (OLMo-2/3's ``q_norm`` is ``H * hd`` wide) or keep one norm
weight per head (Cohere's and StableLM's optional qk-norms), which head removal would have to slice
and, for OLMo, would change.
"""

from .base import AttentionSpec, ModelAdapter, gated_mlp_tensors

LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


class LlamaAdapter(ModelAdapter):
    model_types = (
        "llama", "mistral", "qwen2", "qwen3", "granite", "smollm3", "ministral", "ministral3",
        "seed_oss", "ernie4_5", "exaone4", "hunyuan_v1_dense", "cohere2",
    )  # fmt: skip
    layers_path = "model.layers"
    width_attr = "intermediate_size"
    tensors = gated_mlp_tensors()
    attention_modules = LLAMA_ATTENTION
    attention = AttentionSpec()


class GatedMLPAdapter(LlamaAdapter):
    model_types = ("olmo2", "olmo3", "cohere", "stablelm")
    attention = None
