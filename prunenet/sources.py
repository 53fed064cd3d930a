"""Sources of weights: what a selector reads and a writer writes from, behind one interface.

* :class:`ModelSource`: an instantiated ``transformers`` model (given by the caller, or loaded from a
  folder). Its state matrices are views of the weights; it can run forward passes; the in-memory writer
  slices it in place.
* :class:`CheckpointStream`: a safetensors checkpoint read tensor by tensor under a memory budget: the
  state matrices are loaded on access (:class:`~prunenet.streaming.CheckpointStates`, placed by the
  memory plan), the model runs forward with one decoder block resident at a time
  (:mod:`prunenet.offload`), and the shard writer copies it shard by shard.

Both serve every selector and both ``--modules``: a selector's :data:`~prunenet.selectors.NEEDS` decides
how a stream plans its memory (:func:`plan_source`: the state matrices, or one block resident for the
forward passes), not whether it can run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .adapters import ModelAdapter, get_adapter
from .compensation import layer_bytes, solve_bytes
from .config import CompressConfig, PruneConfig
from .distributed import Distributed
from .dtypes import TORCH_DTYPES
from .memory_plan import (
    ForwardPlan,
    MemoryPlan,
    bound_heap_growth,
    compensation_layers,
    free_memory,
    plan_forward,
    plan_memory,
)
from .selectors import SELECTORS
from .streaming import CheckpointError, CheckpointSource, CheckpointStates, CheckpointUnreadable
from .validate import parse_size

log = logging.getLogger(__name__)


class Source:
    """Common interface. Attributes: ``config`` (the model's ``PretrainedConfig``), ``adapter``, ``streaming``,
    ``spill_grams`` (training keeps ``W^T W`` in a file), ``memory_plan`` (``None`` in memory), ``tokenizer``
    (the model's, for selectors that read text; ``None`` where none was given)."""

    streaming = False
    spill_grams = False
    memory_plan: MemoryPlan | None = None
    tokenizer = None

    def __init__(self, config, adapter: ModelAdapter):
        self.config, self.adapter = config, adapter

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers(self.config)

    @property
    def num_units(self) -> int:
        """FFNs that each keep their own neurons: one per layer, or one per expert of every layer."""
        return self.adapter.num_units(self.config)

    @property
    def width(self) -> int:
        """FFN width ``n``."""
        return self.adapter.ffn_width(self.config)

    def states(self) -> Sequence[torch.Tensor]:
        """The state matrices ``(n, d)`` (the first in-projection of every FFN unit), read-only."""
        raise NotImplementedError

    def numel(self) -> int:
        """Stored elements (parameters and persistent buffers; tied weights count once)."""
        raise NotImplementedError

    def run_model(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """``with source.run_model() as model:`` a model that runs forward (for selectors that need ``"model"``)."""
        raise NotImplementedError

    @property
    def out_dtype(self) -> torch.dtype:
        """The dtype the model runs its out-projections in (that of refitted columns, ``--compensate``)."""
        raise NotImplementedError

    def compensation_layers(self, k: int) -> int:
        """How many layers' compensation one forward pass may accumulate, keeping ``k`` neurons per unit.

        Raises:
            ValueError: memory cannot hold even one layer's.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Drop the state matrices (and any reader threads)."""


class ModelSource(Source):
    """An instantiated causal LM (and its tokenizer and folder, when loaded from one).

    Its weights are checked finite once, where the model comes from: :func:`~prunenet.models.load_model` for a
    folder, :func:`~prunenet.pipeline.prune_` for a caller's model (a NaN or infinity anywhere would be saved
    into the output, whatever the selector reads).
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, path: Path | None = None, budget: int | None = None):
        """``budget``: the run's ``--max-memory`` in bytes, which the model's weights and compensation share
        (``None``: what the device has free)."""
        super().__init__(model.config, get_adapter(model.config))
        self.model, self.tokenizer, self.path, self.budget = model, tokenizer, path, budget
        self._states: list[torch.Tensor] | None = None

    def states(self) -> list[torch.Tensor]:
        if self._states is None:
            self._states = [self.adapter.layer_state(self.model, i) for i in range(self.num_units)]
        return self._states

    def numel(self) -> int:
        from .model_size import count_parameters

        return count_parameters(self.model)

    def run_model(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        return contextlib.nullcontext(self.model)

    @property
    def out_dtype(self) -> torch.dtype:
        return self.model.get_parameter(self.adapter.block_prefix(0) + self.adapter.out_projection.name).dtype

    def compensation_layers(self, k: int) -> int:
        """Half of what the model's device has free now (the forward passes' activations take some), and no more
        than ``--max-memory`` leaves beside the weights."""
        device = next(self.model.parameters()).device
        available = free_memory(device) // 2
        if self.budget is not None:
            from .model_size import weight_bytes

            available = min(available, self.budget - weight_bytes(self.model))
        return compensation_layers(self.adapter, self.config, k, self.out_dtype.itemsize, available)

    def close(self) -> None:
        self._states = None  # views of weights that slicing replaces


class CheckpointStream(Source):
    """A safetensors checkpoint, streamed: never instantiated whole. ``layers``: the ones this rank reads.

    Every tensor is checked finite as it is read (:meth:`~prunenet.streaming.CheckpointSource.read`: the state
    matrices, the attention's ``o_proj``) or copied (the shard writer); a run that runs the model checks them
    all before the model is built.

    ``plan`` is a :class:`~prunenet.memory_plan.MemoryPlan` (selectors that read weights) or a
    :class:`~prunenet.memory_plan.ForwardPlan` (selectors that run the model).
    """

    streaming = True

    def __init__(self, checkpoint: CheckpointSource, config, adapter: ModelAdapter, plan: MemoryPlan | ForwardPlan,
                 device: str, layers: range):  # fmt: skip
        super().__init__(config, adapter)
        self.checkpoint, self.memory_plan, self.device, self.layers = checkpoint, plan, device, layers
        self.spill_grams = getattr(plan, "grams", None) == "disk"
        self._states: CheckpointStates | None = None

    def states(self) -> CheckpointStates:
        if self._states is None:
            residency = getattr(self.memory_plan, "states", "disk")
            self._states = CheckpointStates(
                self.checkpoint, self.adapter, self.config, self.device, residency, layers=self.layers
            )
        return self._states

    def numel(self) -> int:
        return self.checkpoint.numel()

    @functools.cached_property
    def tokenizer(self):
        """The checkpoint folder's tokenizer, loaded on first use (only selectors that read text need it)."""
        from .models import read_tokenizer

        return read_tokenizer(self.checkpoint.folder)

    def run_model(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        from .offload import OffloadedModel

        blocks = getattr(self.memory_plan, "blocks", "disk")
        dtype = self.checkpoint.state_dtype(self.adapter, self.config)
        # accelerate reads the blocks itself: check every tensor first, or a NaN would surface as the model's
        # non-finite output, not as the tensor that holds it (a pass over the weights, against one per token).
        self.checkpoint.check_finite()
        return OffloadedModel(self.checkpoint.folder, self.config, self.adapter, self.device, dtype, blocks)

    @property
    def out_dtype(self) -> torch.dtype:
        return self.checkpoint.state_dtype(self.adapter, self.config)  # the offloaded model runs as stored

    def compensation_layers(self, k: int) -> int:
        """The forward plan's (:func:`~prunenet.memory_plan.plan_forward`)."""
        return self.memory_plan.compensation_layers

    def close(self) -> None:
        if self._states is not None:
            self._states.close()
            self._states = None


def _converted_to(dtype: str) -> torch.dtype | None:
    """The dtype ``--dtype`` loads floating-point weights in; ``None`` for ``"auto"`` (as stored)."""
    return TORCH_DTYPES[dtype] if dtype != "auto" else None


def _stored_dtype(checkpoint: CheckpointSource | None, adapter, config) -> torch.dtype:
    """``--dtype auto``: the FFN weights' stored dtype (safetensors), else the config's, else float32."""
    if checkpoint is not None:
        stored = checkpoint.state_dtype(adapter, config)
        if stored.is_floating_point:
            return stored
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) and declared.is_floating_point else torch.float32


class SourcePlan:
    """A model folder read as far as possible without loading weights: its config, adapter and checkpoint
    index, and whether it streams (:func:`plan_source`). :meth:`open` then loads it."""

    def __init__(self, path: Path, config, adapter: ModelAdapter, checkpoint: CheckpointSource | None,
                 settings: CompressConfig, plan: MemoryPlan | None, layers: range):  # fmt: skip
        self.path, self.config, self.adapter, self.checkpoint = path, config, adapter, checkpoint
        self.settings, self.memory_plan, self.layers = settings, plan, layers

    def output_bytes_at_least(self) -> int | None:
        """A lower bound of the output's size: its tensors' bytes (in ``--dtype``), every FFN tensor at ``k`` of
        its ``n`` neurons, with ``--modules ffn+attn`` the attention projections at the KV groups kept, every
        other tensor (embeddings, norms, head) whole. Headers, tokenizer and config are not counted.
        ``None``: unknown (no safetensors to read sizes from)."""
        if self.checkpoint is None:
            return None
        from .attention import kept_groups_count

        adapter, config, settings = self.adapter, self.config, self.settings
        n = adapter.ffn_width(config)
        k = adapter.kept_width(settings.ratio, n, settings.width_multiple)
        shrunk = dict.fromkeys(self.checkpoint.ffn_tensors(adapter, config), (k, n))
        if settings.modules == "ffn+attn":
            kv = adapter.attention_shape(config).kv_heads
            kept = (kept_groups_count(settings.ratio, kv), kv)
            spec = adapter.attention
            for layer in range(adapter.num_layers(config)):
                prefix = adapter.checkpoint_prefix(layer)
                names = [f"{prefix}{m}.{p}" for m in (spec.q, spec.k, spec.v) for p in ("weight", "bias")]
                shrunk.update(dict.fromkeys([*names, f"{prefix}{spec.o}.weight"], kept))  # o's bias is (d,)
        return self.checkpoint.nbytes(_converted_to(settings.dtype), shrunk)

    def open(self) -> Source:
        """The source, weights loaded (in memory) or ready to stream."""
        device = self.settings.device
        if self.memory_plan is not None:
            return CheckpointStream(self.checkpoint, self.config, self.adapter, self.memory_plan, device, self.layers)
        from .models import load_model

        dtype = self.settings.dtype
        dtype = TORCH_DTYPES[dtype] if dtype != "auto" else _stored_dtype(self.checkpoint, self.adapter, self.config)
        model, tokenizer, _ = load_model(str(self.path), device=device, dtype=dtype)
        budget = parse_size(self.settings.max_memory) if self.settings.max_memory is not None else None
        return ModelSource(model, tokenizer, self.path, budget)


def _read_config(path: Path):
    from transformers import AutoConfig

    from .model_errors import ModelLoadError

    errors: tuple[type[Exception], ...] = (OSError, ValueError, KeyError, TypeError)
    try:  # a field of the wrong type (intermediate_size 256.5, "256", null): huggingface_hub's strict dataclasses
        from huggingface_hub.errors import StrictDataclassError

        errors += (StrictDataclassError,)
    except ImportError:  # an older huggingface_hub, which does not check types (adapters' sizes still are)
        pass
    try:
        return AutoConfig.from_pretrained(path)
    except errors as err:
        raise ModelLoadError(f"could not read the model config in {path}: {err}") from None


def _streams(settings: CompressConfig, checkpoint: CheckpointSource | None, path: Path, budget: int,
             dist: Distributed, beside: int = 0) -> bool:  # fmt: skip
    """Streaming or in-memory: forced by ``--streaming``/``--no-streaming`` (a distributed run always streams),
    else streaming when the weights and ``beside`` (bytes the selection holds besides them) exceed ``budget``."""
    streaming = True if dist.active else settings.streaming
    if streaming:
        if checkpoint is None:
            raise ValueError(f"--streaming needs safetensors weights, and {path} has none; use --no-streaming")
        return True
    if streaming is False or checkpoint is None:
        return False
    model_bytes = checkpoint.nbytes(_converted_to(settings.dtype))
    if model_bytes + beside <= budget:
        return False
    log.info("the weights (%.2f GiB) exceed the memory budget (%.2f GiB): streaming", model_bytes / 2**30,
             budget / 2**30)  # fmt: skip
    return True


def check_prunable(settings: PruneConfig, adapter: ModelAdapter, config) -> int:
    """Check that the run can prune this model (its family can slice what ``--modules`` asks, the ratio
    leaves a neuron); returns ``k``."""
    from .attention import check_modules

    check_modules(settings.modules, adapter, config)
    width = adapter.ffn_width(config)
    k = adapter.kept_width(settings.ratio, width, settings.width_multiple)
    if k < 1:
        raise ValueError(f"--ratio {settings.ratio} leaves no FFN neurons (FFN width {width})")
    return k


def plan_source(path: str | os.PathLike, settings: CompressConfig, dist: Distributed | None = None) -> SourcePlan:
    """Read ``path``'s config and checkpoint index, check that the run can work on it, and decide streaming.

    ``settings.device`` must be concrete (not ``"auto"``). No weights are loaded.

    Raises:
        ModelLoadError: unreadable config or corrupt safetensors. UnsupportedModelError: unknown family.
        ValueError: a size in the config is not a positive integer, or does not describe the checkpoint (its
            block count, its FFN tensors' shapes); the ratio leaves no neurons, the family cannot slice
            attention, streaming is forced where it cannot serve, or a dtype conversion is asked of a stream.
    """
    from .model_errors import ModelLoadError

    dist = dist or Distributed()
    path = Path(path)
    config = _read_config(path)
    adapter = get_adapter(config)
    adapter.check_sizes(config)  # what every later step computes with, before any of them
    try:
        checkpoint = CheckpointSource(path) if CheckpointSource.has_safetensors(path) else None
    except CheckpointUnreadable as err:
        raise ModelLoadError(f"the weights in {path} cannot be read: {err}") from None
    except CheckpointError as err:
        raise ModelLoadError(f"the weights in {path} are truncated or corrupt: {err}") from None
    if checkpoint is not None:  # a config that does not describe its weights fails here, not minutes later
        checkpoint.check_against_config(adapter, config)
    k = check_prunable(settings, adapter, config)
    width = adapter.ffn_width(config)
    budget = parse_size(settings.max_memory) if settings.max_memory is not None else free_memory(settings.device)
    layers = dist.owned_layers(adapter.num_units(config))
    compensates = "compensate" in SELECTORS[settings.method].options and settings.compensate
    compensate_k = k if compensates and k < width else None
    beside = 0
    if compensate_k is not None and checkpoint is not None:  # in memory, one layer's compensation at least
        itemsize = (_converted_to(settings.dtype) or checkpoint.state_dtype(adapter, config)).itemsize
        beside = layer_bytes(adapter, config, itemsize) + solve_bytes(adapter, config, compensate_k)
    if not _streams(settings, checkpoint, path, budget, dist, beside):
        if beside and settings.max_memory is not None:  # --no-streaming: refused before the weights load
            compensation_layers(adapter, config, k, itemsize, budget - checkpoint.nbytes(_converted_to(settings.dtype)))
        return SourcePlan(path, config, adapter, checkpoint, settings, None, layers)
    bound_heap_growth()  # the budget is a promise: freed blocks go back to the system
    stored = checkpoint.state_dtype(adapter, config)
    if settings.dtype != "auto" and TORCH_DTYPES[settings.dtype] != stored:
        raise ValueError(
            f"streaming copies tensors as stored ({stored}); --dtype {settings.dtype} would need a conversion: "
            "drop --dtype (or pass --dtype auto), or use --no-streaming"
        )
    if SELECTORS[settings.method].needs == "model":
        plan = plan_forward(checkpoint, adapter, config, budget, settings.device, settings.probe_sequences,
                            settings.probe_length, compensate_k)  # fmt: skip
    else:
        from .ops import resolve_reward_backend

        trains = "reward_backend" in SELECTORS[settings.method].options  # W^T W matter only to policy training
        backend = resolve_reward_backend(settings.reward_backend, settings.device) if trains else "torch"
        plan = plan_memory(len(layers), width, adapter.hidden_size(config), stored.itemsize, k, budget,
                           settings.device, backend)  # fmt: skip
    log.info("streaming %s tensor by tensor; %s", path, plan.describe())
    return SourcePlan(path, config, adapter, checkpoint, settings, plan, layers)
