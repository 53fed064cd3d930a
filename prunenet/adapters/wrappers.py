"""Multimodal wrappers whose language model is a supported family: Gemma 3 (4B and up) and Mistral 3.

``Gemma3ForConditionalGeneration`` and ``Mistral3ForConditionalGeneration`` hold a vision tower, a projector
and the language model, whose blocks are ``model.language_model.layers`` in memory and
``language_model.model.layers`` in the checkpoint; its config is ``config.text_config``. Only the language
model's FFNs are pruned (the vision tower's MLPs are not on that path); the wrapper reloads with its own
Auto class, ``AutoModelForImageTextToText``.
"""

from .base import ModelAdapter
from .gemma import GemmaAdapter
from .llama import LlamaAdapter


class _Wrapper(ModelAdapter):
    layers_path = "model.language_model.layers"
    checkpoint_layers_path = "language_model.model.layers"
    text_config_attr = "text_config"
    auto_class = "AutoModelForImageTextToText"
    # --modules ffn+attn is not offered for wrappers: the tests of attention slicing cover causal LMs only.
    attention = None


class Gemma3Adapter(_Wrapper, GemmaAdapter):
    model_types = ("gemma3",)


class Mistral3Adapter(_Wrapper, LlamaAdapter):
    model_types = ("mistral3",)

    def check_config(self, config) -> None:
        text_type = getattr(config.text_config, "model_type", None)
        if text_type not in LlamaAdapter.model_types:
            raise ValueError(
                f"this mistral3 model's language model is {text_type!r}, not a Llama-layout family PruneNet prunes"
            )
