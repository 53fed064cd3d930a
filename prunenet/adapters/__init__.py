"""Model-family adapters, chosen by ``config.model_type`` (never by a model's name or path).

To add a new family: if its FFN has a known layout under a new ``model_type``, add the name to that
adapter's ``model_types``; otherwise write ``adapters/<family>.py`` with a :class:`ModelAdapter`
subclass (``base.py`` documents every attribute) and list it in ``_ADAPTERS``. A family whose FFN cannot
be pruned to one stock-loadable width goes into ``refused.REFUSED`` with its reason. Then add a tiny
config to ``tests/tiny_models.py``: the parametrized tests check the family like every other.
"""

from .base import ModelAdapter, NeuronTensor
from .falcon import FalconAdapter
from .gemma import GemmaAdapter
from .glm import GlmAdapter
from .gpt2 import GPT2Adapter
from .gpt_neox import GPTNeoXAdapter
from .llama import GatedMLPAdapter, LlamaAdapter
from .moe import GraniteMoeAdapter, MixtralAdapter, OlmoeAdapter, Qwen3MoeAdapter
from .opt import OPTAdapter
from .phi import PhiAdapter
from .phi3 import Phi3Adapter
from .refused import REFUSED
from .ungated import StarCoder2Adapter, UpDownMLPAdapter
from .wrappers import Gemma3Adapter, Mistral3Adapter

_ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlamaAdapter,
    GatedMLPAdapter,
    GlmAdapter,
    UpDownMLPAdapter,
    StarCoder2Adapter,
    GemmaAdapter,
    PhiAdapter,
    Phi3Adapter,
    OPTAdapter,
    FalconAdapter,
    GPT2Adapter,
    GPTNeoXAdapter,
    MixtralAdapter,
    Qwen3MoeAdapter,
    OlmoeAdapter,
    GraniteMoeAdapter,
    Gemma3Adapter,
    Mistral3Adapter,
)
REGISTRY: dict[str, type[ModelAdapter]] = {t: cls for cls in _ADAPTERS for t in cls.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(REGISTRY))
ATTENTION_MODEL_TYPES: tuple[str, ...] = tuple(t for t in SUPPORTED_MODEL_TYPES if REGISTRY[t].attention is not None)
"""The model types whose attention ``compress --modules ffn+attn`` can slice."""


class UnsupportedModelError(ValueError):
    """The model's ``config.model_type`` has no adapter."""


def auto_class_name(config) -> str:
    """The ``transformers`` Auto class that builds a model of ``config``'s family (the causal-LM one for a
    family without an adapter, so that loading it gets as far as the unsupported-family error)."""
    adapter = REGISTRY.get(getattr(config, "model_type", None))
    return adapter.auto_class if adapter is not None else "AutoModelForCausalLM"


def get_adapter(config) -> ModelAdapter:
    """The adapter for ``config.model_type``.

    Raises:
        UnsupportedModelError: naming the model type and every supported one, or why a known type is refused.
    """
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise UnsupportedModelError(f"model type {model_type!r} cannot be pruned: {REFUSED[model_type]}")
    try:
        adapter = REGISTRY[model_type]()
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported model type {model_type!r}; PruneNet supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None
    try:
        adapter.check_config(config)
    except ValueError as err:
        raise UnsupportedModelError(str(err)) from None
    return adapter


__all__ = [
    "ATTENTION_MODEL_TYPES",
    "ModelAdapter",
    "NeuronTensor",
    "REFUSED",
    "REGISTRY",
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedModelError",
    "auto_class_name",
    "get_adapter",
]
