"""Model-family adapters, chosen by ``config.model_type`` (never by a model's name or path)."""

from .base import ModelAdapter, NeuronTensor
from .falcon import FalconAdapter
from .gemma import GemmaAdapter
from .gpt2 import GPT2Adapter
from .gpt_neox import GPTNeoXAdapter
from .llama import LlamaAdapter
from .opt import OPTAdapter
from .phi import PhiAdapter
from .phi3 import Phi3Adapter

_ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlamaAdapter,
    GemmaAdapter,
    PhiAdapter,
    Phi3Adapter,
    OPTAdapter,
    FalconAdapter,
    GPT2Adapter,
    GPTNeoXAdapter,
)
REGISTRY: dict[str, type[ModelAdapter]] = {t: cls for cls in _ADAPTERS for t in cls.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(REGISTRY))
ATTENTION_MODEL_TYPES: tuple[str, ...] = tuple(t for t in SUPPORTED_MODEL_TYPES if REGISTRY[t].attention is not None)
"""The model types whose attention ``compress --modules ffn+attn`` can slice."""


class UnsupportedModelError(ValueError):
    """The model's ``config.model_type`` has no adapter."""


def get_adapter(config) -> ModelAdapter:
    """The adapter for ``config.model_type``.

    Raises:
        UnsupportedModelError: naming the model type and every supported one.
    """
    model_type = getattr(config, "model_type", None)
    try:
        return REGISTRY[model_type]()
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported model type {model_type!r}; PruneNet supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None


__all__ = [
    "ATTENTION_MODEL_TYPES",
    "ModelAdapter",
    "NeuronTensor",
    "REGISTRY",
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedModelError",
    "get_adapter",
]
