"""The coverage table of the docs (``docs/usage.md``'s generated ``families`` block), from the adapters."""

from __future__ import annotations

from .base import ModelAdapter, NeuronTensor


def _axis_words(spec: NeuronTensor) -> str:
    # An nn.Linear weight (out, in) has its neurons on rows for in-projections and columns for the
    # out-projection; GPT-2's Conv1D stores the transpose, which the axis already says.
    words = "rows" if spec.axis == 0 else "columns"
    if spec.groups > 1:
        words += f" `j`, `n + j`{', ...' if spec.groups > 2 else ''} together"
    return words


def describe_tensors(adapter: type[ModelAdapter]) -> str:
    """``gate_proj``, ``up_proj`` rows; ``down_proj`` columns; biases where present — from the specs."""
    weights = [s for s in adapter.tensors if not s.name.endswith(".bias")]
    parts = [f"`{s.name.removesuffix('.weight').rpartition('.')[2]}` {_axis_words(s)}" for s in weights]
    if any(s.name.endswith(".bias") for s in adapter.tensors):
        parts.append("in-projection biases where present")
    text = "; ".join(parts)
    if adapter.experts_attr is not None:
        stored = adapter.checkpoint_tensors or adapter.tensors
        per_expert = any("{expert}" in s.name for s in stored)
        text = (
            f"every routed expert (`{adapter.experts_attr}`) keeps its own neurons: fused {text}; "
            f"checkpoints store {'one tensor per expert' if per_expert else 'the fused tensors'}; the router is kept"
        )
    if adapter.text_config_attr is not None:
        text = f"the language model's only (the vision tower is kept): {text}"
    return text


def markdown_table() -> str:
    """One row per adapter (its ``model_type`` values together), then one per refused type."""
    from ..tables import markdown_table as table
    from . import _ADAPTERS
    from .refused import REFUSED

    headers = ["`model_type`", "FFN tensors pruned (neuron axis)", "width in config", "`--method`", "streaming",
               "attention slicing"]  # fmt: skip
    rows = []
    for adapter in _ADAPTERS:
        types = ", ".join(f"`{t}`" for t in adapter.model_types)
        attention = "yes" if adapter.attention is not None else "no"
        width = f"`{adapter.text_config_attr + '.' if adapter.text_config_attr else ''}{adapter.width_attr}`"
        if adapter.width_multiple > 1:
            width += f" (kept width a multiple of {adapter.width_multiple})"
        rows.append([types, describe_tensors(adapter), width, "every one", "yes", attention])
    reasons: dict[str, list[str]] = {}
    for model_type, reason in REFUSED.items():
        reasons.setdefault(reason, []).append(f"`{model_type}`")
    for reason, types in reasons.items():
        rows.append([", ".join(types), f"refused: {reason}", "-", "-", "-", "-"])
    return table(headers, rows)
