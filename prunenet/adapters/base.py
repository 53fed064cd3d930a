"""The adapter contract: every fact about a model family that pruning needs, and nowhere else.

An adapter knows where the family keeps its FFN tensors and its FFN width, how its config states its sizes
(layers, hidden size, attention shape, context length, vocabulary; a wrapper's in its ``text_config``), how
its fused experts compute, and what its modules record about their shapes. It describes the FFN
declaratively, by parameter names relative to a block, so the same description serves an instantiated
``nn.Module`` (``model.get_parameter(name)``) and a safetensors checkpoint read tensor by tensor (the names
are the state-dict keys, unless ``checkpoint_tensors`` or ``checkpoint_layers_path`` say how a checkpoint
stores them: fused experts one tensor per expert, a wrapper's language model under another prefix). Outside
``prunenet/adapters/`` no module reads a family's config fields (tests/test_architecture.py checks it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..widths import kept_width


@dataclass(frozen=True)
class NeuronTensor:
    """One FFN parameter that has an axis indexed by FFN neurons (intermediate units).

    Attributes:
        name: parameter name relative to a block, e.g. ``"mlp.gate_proj.weight"``.
        axis: the axis whose entries are FFN neurons: 0 for in-projection rows and their
            biases (``nn.Linear(d, n).weight`` is ``(n, d)``), 1 for out-projection columns.
        groups: how many neuron-sized groups the axis holds. Fused projections stack several
            in-projections along one axis (Phi-3's ``gate_up_proj`` is ``(2n, d)``: gate rows
            ``0..n-1``, up rows ``n..2n-1``); neuron ``j`` is entry ``j + g * n`` of group ``g``.
        optional: the parameter exists only in some configurations (biases).
        role: ``"in"`` for in-projections (and their biases), ``"out"`` for the out-projection, whose
            input is the FFN's activations.
        experts: the parameter holds every routed expert of a mixture-of-experts block along a leading
            axis (``(E, g*n, d)``, ``(E, d, n)``, ``(E, g*n)``); ``axis`` still counts within one expert, so
            the stored neuron axis is ``axis + 1``.
    """

    name: str
    axis: int
    groups: int = 1
    optional: bool = False
    role: str = "in"
    experts: bool = False

    @property
    def stored_axis(self) -> int:
        """The neuron axis of the stored parameter (after the expert axis, if any)."""
        return self.axis + 1 if self.experts else self.axis

    def expert(self, index: int) -> NeuronTensor:
        """This spec for expert ``index`` of a checkpoint storing one tensor per expert (``{expert}`` in the name)."""
        return dataclasses.replace(self, name=self.name.format(expert=index), experts=False)

    def indices(self, keep: torch.Tensor, width: int) -> torch.Tensor:
        """Entries along ``axis`` to keep, for kept neurons ``keep`` (``(k,)``, sorted) of ``width``.

        Returns ``(groups * k,)`` int64, sorted ascending (group-major), so a fused tensor is
        compacted in one gather.
        """
        return neuron_entries(keep, width, self.groups)


def neuron_entries(keep: torch.Tensor, width: int, groups: int) -> torch.Tensor:
    """Entries of an axis holding ``groups`` neuron groups of ``width`` for kept neurons ``keep``.

    Args:
        keep: ``(k,)`` sorted int64 neurons in ``[0, width)``.

    Returns:
        ``(groups * k,)`` int64, sorted: ``keep``, ``keep + width``, ... (``keep`` itself when ``groups == 1``).
    """
    if groups == 1:
        return keep
    return torch.cat([keep + g * width for g in range(groups)])


@dataclass(frozen=True)
class AttentionSpec:
    """Where a block's attention projections are, for slicing whole key/value head groups.

    Names are module paths relative to a block, each an ``nn.Linear`` whose ``weight`` is
    ``(out, in)``: ``q`` is ``(H * hd, d)``, ``k`` and ``v`` are ``(KV * hd, d)``, ``o`` is ``(d, H * hd)``
    (``H`` query heads, ``KV`` key/value heads, head size ``hd``). Biases are sliced where present.
    """

    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"


class AttentionShape(NamedTuple):
    """``(heads, kv_heads, head_dim)`` of a config; ``group = heads // kv_heads`` query heads per KV head."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


class ModelAdapter:
    """Describes one model family's FFN for PruneNet. Subclasses set the class attributes.

    Attributes:
        model_types: the ``config.model_type`` values this adapter serves (the registry key;
            never a substring of a model's name or path).
        layers_path: dotted path of the block list in the ``*ForCausalLM`` module,
            e.g. ``"model.layers"``.
        width_attr: the config attribute holding the FFN width ``n``.
        tensors: every neuron-indexed FFN parameter of a block. ``tensors[0]`` is the first
            in-projection, whose neuron rows form the policy's state matrix (as in the paper).
        attention_modules: module paths (relative to a block) of the attention's linear projections;
            recovery fine-tuning puts LoRA adapters on them (and on the FFN's).
        attention: where the separate q/k/v/o projections are, for ``compress --modules ffn+attn``;
            ``None`` where attention slicing is not supported (fused qkv projections, no GQA config).
        conv1d: the projections are GPT-2-style ``Conv1D`` modules storing ``weight`` as ``(in, out)``
            (LoRA then needs ``fan_in_fan_out``).
        experts_attr: mixture-of-experts families: the config attribute holding the number of routed
            experts ``E``. Every block's FFN is then ``E`` experts of width ``n``, fused in memory
            (``tensors`` with ``experts=True``); each expert is one *unit* that keeps its own ``k``
            neurons. ``None`` for a dense FFN (one unit per block).
        checkpoint_tensors: the same FFN as a checkpoint stores it, where that differs from the module's
            parameters: ``transformers`` saves most fused experts one tensor per expert, with ``{expert}``
            in the name (``"mlp.experts.{expert}.gate_proj.weight"``). ``None``: the state-dict keys are
            the parameter names.
        text_config_attr: multimodal wrappers (``*ForConditionalGeneration``): the config attribute holding
            the language model's config (``"text_config"``), where its layer count, widths, special tokens
            and attention shape are; ``None`` where the model's config is the language model's.
        checkpoint_layers_path: the block list's path in the checkpoint's tensor names, where it differs from
            the module path (a wrapper's ``model.language_model.layers`` is stored as
            ``language_model.model.layers``).
        auto_class: the ``transformers`` Auto class that builds the model (a wrapper's is
            ``AutoModelForImageTextToText``).
        width_multiple: the kept width is rounded down to a multiple of this. Fused experts run through
            ``torch._grouped_mm``, which needs every row stride to be a multiple of 16 bytes: 8
            bfloat16 entries.
    """

    model_types: tuple[str, ...] = ()
    layers_path: str = ""
    width_attr: str = "intermediate_size"
    tensors: tuple[NeuronTensor, ...] = ()
    attention_modules: tuple[str, ...] = ()
    attention: AttentionSpec | None = None
    conv1d: bool = False
    experts_attr: str | None = None
    checkpoint_tensors: tuple[NeuronTensor, ...] | None = None
    width_multiple: int = 1
    text_config_attr: str | None = None
    checkpoint_layers_path: str | None = None
    auto_class: str = "AutoModelForCausalLM"

    @property
    def out_projection(self) -> NeuronTensor:
        """The out-projection's weight (``down_proj``, ``fc2``, GPT-2's ``c_proj``): its input is the activations."""
        return next(t for t in self.tensors if t.role == "out" and not t.name.endswith("bias"))

    def lora_targets(self) -> list[str]:
        """Module paths, relative to a block, of every FFN and attention projection: LoRA's ``target_modules``.

        ``peft`` matches a listed name against the end of each module's full name, so ``"mlp.c_proj"``
        (GPT-2's FFN out-projection) is told apart from ``"attn.c_proj"``.
        """
        # Drop ".weight"/".bias"; fused experts are 3-D parameters, not nn.Linear modules LoRA could wrap.
        ffn = dict.fromkeys(spec.name.rpartition(".")[0] for spec in self.tensors if not spec.experts)
        return [*ffn, *self.attention_modules]

    # -- config ---------------------------------------------------------------------------
    def text_config(self, config):
        """The language model's config: ``config`` itself, or a wrapper's ``text_config``."""
        return getattr(config, self.text_config_attr) if self.text_config_attr else config

    def config_field(self, config, attr: str) -> str:
        """The ``config.json`` key of ``attr`` for messages: ``"text_config.intermediate_size"`` in a wrapper,
        GPT-2's ``"n_embd"`` for ``hidden_size`` (``attribute_map``)."""
        key = getattr(type(self.text_config(config)), "attribute_map", {}).get(attr, attr)
        return f"{self.text_config_attr}.{key}" if self.text_config_attr else key

    def config_size(self, config, attr: str) -> int:
        """The language model's ``config.<attr>``, a positive integer.

        Raises:
            ValueError: naming the ``config.json`` field and its value (``256.5``, ``"256"``, ``null``, ``-5``):
                ``int()`` would round the first, parse the second and fail on the third with a ``TypeError``.
        """
        value = getattr(self.text_config(config), attr, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            shown = json.dumps(value) if isinstance(value, str | None) else value
            raise ValueError(f"config.json: {self.config_field(config, attr)} must be a positive integer, got {shown}")
        return value

    def num_layers(self, config) -> int:
        """Number of transformer blocks."""
        return self.config_size(config, "num_hidden_layers")

    def hidden_size(self, config) -> int:
        """Model width ``d`` (columns of the state matrix)."""
        return self.config_size(config, "hidden_size")

    def ffn_width(self, config) -> int:
        """FFN width ``n`` (rows of the state matrix)."""
        return self.config_size(config, self.width_attr)

    def set_ffn_width(self, config, width: int) -> None:
        """Record the pruned FFN width ``k`` in ``config`` so a stock reload builds ``k``-wide FFNs."""
        setattr(self.text_config(config), self.width_attr, int(width))

    def num_experts(self, config) -> int:
        """Routed experts per block ``E`` (1 for a dense FFN)."""
        return self.config_size(config, self.experts_attr) if self.experts_attr else 1

    def check_sizes(self, config) -> None:
        """Raise ``ValueError`` (:meth:`config_size`) unless every size this adapter reads from the config is a
        positive integer: blocks, hidden size, FFN width, experts."""
        for size in (self.num_layers, self.hidden_size, self.ffn_width, self.num_experts):
            size(config)

    def num_units(self, config) -> int:
        """FFNs that each keep their own neurons: one per block, or one per expert of every block (``L * E``).

        Unit ``u`` is expert ``u % E`` of block ``u // E``; selectors return one ``(k,)`` vector per unit.
        """
        return self.num_layers(config) * self.num_experts(config)

    def context_length(self, config) -> int | None:
        """The most positions the language model covers (``max_position_embeddings``, which GPT-2-style configs
        map to ``n_positions``), or ``None`` where its config sets none."""
        limit = getattr(self.text_config(config), "max_position_embeddings", None)
        return int(limit) if limit else None

    def capped_length(self, config, length: int) -> int:
        """``length`` tokens, at most :meth:`context_length`: a sequence never runs past a learned position
        table (GPT-2's fails with an IndexError beyond it)."""
        limit = self.context_length(config)
        return min(length, limit) if limit else length

    def attention_shape(self, config) -> AttentionShape:
        """``(H, KV, hd)`` of the language model's attention: ``num_attention_heads``, ``num_key_value_heads``
        (default ``H``: multi-head attention) and ``head_dim`` (default ``hidden_size / H``)."""
        text = self.text_config(config)
        heads = int(text.num_attention_heads)
        kv = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
        return AttentionShape(heads, int(kv), int(head_dim))

    def set_attention_heads(self, config, shape: AttentionShape, groups: int) -> None:
        """Record that every block keeps ``groups`` of its KV groups: ``num_attention_heads = groups * G``,
        ``num_key_value_heads = groups`` and an explicit ``head_dim`` in the language model's config."""
        text = self.text_config(config)
        # head_dim must be explicit: transformers derives it as hidden_size // num_attention_heads otherwise.
        text.head_dim = shape.head_dim
        text.num_attention_heads = groups * shape.group
        text.num_key_value_heads = groups

    def vocab_size(self, config) -> int:
        """Tokens the language model's embedding and head cover (0 where its config does not say)."""
        return int(getattr(self.text_config(config), "vocab_size", None) or 0)

    def kept_multiple(self, multiple: int = 1) -> int:
        """What a kept width is a multiple of: both ``multiple`` (the user's ``--width-multiple``) and the
        family's ``width_multiple``."""
        return math.lcm(multiple, self.width_multiple)

    def kept_width(self, ratio: float, width: int, multiple: int = 1) -> int:
        """``k`` for ``ratio``: ``floor((1 - ratio) * n)``, rounded down to :meth:`kept_multiple` (never below
        it, never above ``n``)."""
        return kept_width(ratio, width, self.kept_multiple(multiple))

    def check_config(self, config) -> None:
        """Raise ``ValueError`` (one line) for a configuration of this family that cannot be pruned."""

    def stored_tensors(self, layer: int, config) -> list[tuple[str, NeuronTensor, int | None]]:
        """``(checkpoint name, spec, unit)`` of every neuron-indexed tensor of block ``layer`` as a checkpoint
        stores it (see ``checkpoint_tensors``). ``unit`` is the FFN unit the tensor belongs to, or ``None`` for
        a fused tensor of all the block's experts (``spec.experts``)."""
        experts = self.num_experts(config)
        prefix = self.checkpoint_prefix(layer)
        out = []
        for spec in self.checkpoint_tensors or self.tensors:
            if "{expert}" in spec.name:
                for e in range(experts):
                    one = spec.expert(e)
                    out.append((prefix + one.name, one, layer * experts + e))
            else:
                out.append((prefix + spec.name, spec, None if spec.experts else layer))
        return out

    # -- tensors --------------------------------------------------------------------------
    def block_prefix(self, layer: int) -> str:
        """Parameter-name prefix of block ``layer``, e.g. ``"model.layers.3."``."""
        return f"{self.layers_path}.{layer}."

    def checkpoint_prefix(self, layer: int) -> str:
        """Tensor-name prefix of block ``layer`` in a checkpoint (the parameter prefix unless stored otherwise)."""
        return f"{self.checkpoint_layers_path or self.layers_path}.{layer}."

    def state_matrix(self, first_in_proj: torch.Tensor, width: int, spec: NeuronTensor | None = None) -> torch.Tensor:
        """The policy's state matrix ``(n, d)`` from one FFN's first in-projection (a view, no copy).

        Args:
            first_in_proj: the tensor ``spec`` names, for one expert where it holds several.
            width: FFN width ``n``.
            spec: how it is stored (default ``tensors[0]``).
        """
        spec = spec or self.tensors[0]
        w = first_in_proj if spec.axis == 0 else first_in_proj.t()
        return w[:width] if spec.groups > 1 else w

    def neuron_parameters(self, model: torch.nn.Module, layer: int) -> list[tuple[NeuronTensor, torch.nn.Parameter]]:
        """The neuron-indexed parameters of block ``layer`` present in ``model``.

        Raises:
            KeyError: a required parameter is missing (the model does not match this adapter).
        """
        found = []
        for spec in self.tensors:
            name = self.block_prefix(layer) + spec.name
            try:
                found.append((spec, model.get_parameter(name)))
            except AttributeError:
                if not spec.optional:
                    raise KeyError(f"{type(self).__name__}: the model has no parameter {name!r}") from None
        return found

    def record_sliced_shapes(self, model: torch.nn.Module, layer: int, width: int) -> None:
        """After block ``layer``'s FFN is sliced to ``width`` neurons, make what its modules record about
        their weights' shapes true again (``nn.Linear``'s ``in_features``/``out_features``), so ``repr``,
        ``peft`` and ``transformers`` see the real sizes."""
        for spec, param in self.neuron_parameters(model, layer):
            module_name, _, attr = (self.block_prefix(layer) + spec.name).rpartition(".")
            if attr == "weight":
                self.record_weight_shape(model.get_submodule(module_name), param)

    def record_weight_shape(self, module: torch.nn.Module, weight: torch.Tensor) -> None:
        """Make ``module``'s shape attributes describe its (sliced) ``weight``: those of ``nn.Linear``."""
        if isinstance(module, torch.nn.Linear):
            module.out_features, module.in_features = weight.shape

    def layer_state(self, model: torch.nn.Module, unit: int) -> torch.Tensor:
        """State matrix ``(n, d)`` of FFN ``unit`` (a block, or one expert of one) of an instantiated model:
        a view of its weight."""
        experts = self.num_experts(model.config)
        layer, expert = divmod(unit, experts)
        first = model.get_parameter(self.block_prefix(layer) + self.tensors[0].name).detach()
        if self.tensors[0].experts:
            first = first[expert]
        return self.state_matrix(first, self.ffn_width(model.config))

    def neuron_matrices(self, model: torch.nn.Module, unit: int) -> list[torch.Tensor]:
        """Every FFN weight of ``unit`` (a block, or one expert of one) of an instantiated model as neuron-row
        matrices: a list of ``(n, d)`` views, read only.

        In the order of ``tensors``: the in-projections (one matrix per group: a fused ``(2n, d)`` gate/up
        weight gives gate, then up), then the out-projection's columns as rows (transposed). Biases are left out.
        """
        layer, expert = divmod(unit, self.num_experts(model.config))
        width = self.ffn_width(model.config)
        out = []
        for spec, param in self.neuron_parameters(model, layer):
            if spec.name.endswith("bias"):
                continue
            w = param.detach()[expert] if spec.experts else param.detach()
            w = w if spec.axis == 0 else w.t()
            out.extend(w[g * width : (g + 1) * width] for g in range(spec.groups))
        return out


def gated_mlp_tensors(
    prefix: str = "mlp", gate="gate_proj", up="up_proj", down="down_proj"
) -> tuple[NeuronTensor, ...]:
    """Neuron tensors of a gated (SwiGLU/GeGLU) MLP: gate and up rows, down columns, optional biases."""
    return (
        NeuronTensor(f"{prefix}.{gate}.weight", axis=0),
        NeuronTensor(f"{prefix}.{up}.weight", axis=0),
        NeuronTensor(f"{prefix}.{down}.weight", axis=1, role="out"),
        NeuronTensor(f"{prefix}.{gate}.bias", axis=0, optional=True),
        NeuronTensor(f"{prefix}.{up}.bias", axis=0, optional=True),
    )


def fused_gated_mlp_tensors(prefix: str = "mlp") -> tuple[NeuronTensor, ...]:
    """Neuron tensors of a gated MLP with one ``gate_up_proj`` ``(2n, d)`` (gate rows first, then up rows)."""
    return (
        NeuronTensor(f"{prefix}.gate_up_proj.weight", axis=0, groups=2),
        NeuronTensor(f"{prefix}.down_proj.weight", axis=1, role="out"),
    )


def two_layer_mlp_tensors(fc_in: str, fc_out: str, transposed: bool = False) -> tuple[NeuronTensor, ...]:
    """Neuron tensors of a plain two-layer MLP ``fc_out(act(fc_in(x)))``.

    ``transposed`` is for GPT-2's ``Conv1D``, which stores ``weight`` as ``(in, out)``: the
    in-projection is ``(d, n)`` (neurons on axis 1) and the out-projection ``(n, d)`` (axis 0).
    """
    in_axis, out_axis = (1, 0) if transposed else (0, 1)
    return (
        NeuronTensor(f"{fc_in}.weight", axis=in_axis),
        NeuronTensor(f"{fc_out}.weight", axis=out_axis, role="out"),
        NeuronTensor(f"{fc_in}.bias", axis=0, optional=True),
    )
