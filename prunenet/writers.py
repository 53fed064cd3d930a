"""Writers: apply the kept neurons to a source and write the pruned model, behind one interface.

* :class:`ModelWriter` (a :class:`~prunenet.sources.ModelSource`): slices the instantiated model in place
  (:func:`prunenet.slicing.slice_model_`, and the attention's key/value head groups with
  ``--modules ffn+attn``), then ``save_pretrained`` writes it and its tokenizer.
* :class:`ShardWriter` (a :class:`~prunenet.sources.CheckpointStream`): slices each FFN tensor (and
  attention projection) as its shard is copied (:func:`prunenet.shard_writer.write_pruned_checkpoint`);
  the other bytes are copied unchanged. Under ``torchrun`` each rank writes its share of the shards; a
  killed run resumes.

Both slice through the one in-place op, ``torch.ops.prunenet.slice_ffn_`` (or its PyTorch reference). Given
refitted out-projection columns (``--compensate``: a :class:`~prunenet.compensation.ColumnStore`), both write
them over the sliced ones; :meth:`close` then releases the store (its spill folder).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch

from .checkpoint import declare_torch_dtype
from .compensation import ColumnStore
from .config import PruneConfig
from .distributed import Distributed
from .sources import CheckpointStream, ModelSource, Source


class _Writer:
    """What both writers share: the refitted out-projection columns, if any, and their release."""

    def __init__(self, columns: ColumnStore | None = None):
        self.columns = columns

    def close(self) -> None:
        """Release the refitted columns (a spilled store's temporary folder); the writer writes no more."""
        if self.columns is not None:
            self.columns.close()


class ModelWriter(_Writer):
    """Slices a model in memory; :meth:`save` writes it."""

    def __init__(self, source: ModelSource, columns: ColumnStore | None = None):
        super().__init__(columns)
        self.source = source

    def apply(self, keeps: Sequence[torch.Tensor], config: PruneConfig, progress: bool = True) -> dict | None:
        """Slice the FFNs (and with ``--modules ffn+attn`` the attention) in place, the refitted columns in place
        of the out-projections' sliced ones; returns the attention's manifest entry (``None`` for the FFN only)."""
        from .attention import slice_attention_by_ratio_
        from .compensation import write_columns_
        from .slicing import slice_model_

        model, adapter = self.source.model, self.source.adapter
        self.source.close()  # its state matrices are views of the weights slicing replaces
        if keeps[0].numel() < self.source.width:  # keeping every neuron changes nothing
            slice_model_(model, adapter, keeps, progress=progress)
            if self.columns is not None:
                write_columns_(model, self.columns)
        if config.modules == "ffn+attn":
            return slice_attention_by_ratio_(model, adapter, config.ratio, progress)
        return None

    def params_after(self, k: int) -> int:
        return self.source.numel()

    def resume_key(self, keeps: Sequence[torch.Tensor]) -> None:
        return None  # an in-memory run has nothing to resume

    def save(self, folder: Path, keeps, dist: Distributed, progress: bool = True) -> None:
        model = self.source.model
        if getattr(model, "hf_quantizer", None) is None:  # loaded as a float model: a source's block is stale
            drop_quantization(model.config)
        model.save_pretrained(folder)
        declare_torch_dtype(folder)
        self.source.tokenizer.save_pretrained(folder)


class ShardWriter(_Writer):
    """Writes a streamed checkpoint shard by shard, slicing the FFN (and attention) tensors on the way and
    writing the refitted columns (if any) over the out-projections' sliced ones."""

    def __init__(self, source: CheckpointStream, columns: ColumnStore | None = None):
        super().__init__(columns)
        self.source = source
        self.slices = None
        self.config = None  # the pruned model's config

    def apply(self, keeps: Sequence[torch.Tensor], config: PruneConfig, progress: bool = True) -> dict | None:
        """Decide what every tensor keeps (slicing happens while saving); with ``--modules ffn+attn`` the KV
        groups are chosen from each block's ``o_proj`` weight, read from the checkpoint. Returns the
        attention's manifest entry (``None`` for the FFN only)."""
        from .attention import choose_attention
        from .shard_writer import attention_slices, ffn_slices

        checkpoint, adapter, model_config = self.source.checkpoint, self.source.adapter, self.source.config
        self.source.close()  # the state matrices are no longer needed
        self.slices = ffn_slices(checkpoint, adapter, model_config, keeps)
        self.config = type(model_config).from_dict(model_config.to_dict())  # the source's keeps the dense widths
        adapter.set_ffn_width(self.config, keeps[0].numel())
        describe_as_stored(self.config, checkpoint.state_dtype(adapter, model_config))
        if config.modules != "ffn+attn":
            return None
        shape = adapter.attention_shape(model_config)
        o_weights = (checkpoint.read(adapter.checkpoint_prefix(i) + adapter.attention.o + ".weight")
                     for i in range(adapter.num_layers(model_config)))  # fmt: skip
        kept, info = choose_attention(o_weights, shape, config.ratio)
        self.slices.update(attention_slices(checkpoint, adapter, model_config, kept))
        adapter.set_attention_heads(self.config, shape, kept[0].numel())
        return info

    def params_after(self, k: int) -> int:
        from .shard_writer import pruned_numel

        return pruned_numel(self.source.checkpoint, self.slices)

    def resume_key(self, keeps: Sequence[torch.Tensor]) -> str:
        """A run killed half-way (SIGKILL, power loss) leaves its finished shards in a folder named after its
        inputs (the refitted columns included), and the same command resumes from them."""
        from .shard_writer import resume_key

        digest = self.columns.digest if self.columns is not None else None
        return resume_key(self.source.checkpoint, self.slices, digest)

    def save(self, folder: Path, keeps: Sequence[torch.Tensor], dist: Distributed, progress: bool = True) -> None:
        from .shard_writer import finish_checkpoint, out_columns, write_pruned_checkpoint

        checkpoint = self.source.checkpoint
        shards = dist.owned_shards(list(checkpoint.shard_entries))
        columns = None
        if self.columns is not None:  # every rank holds every unit's columns (broadcast by the selector)
            columns = out_columns(checkpoint, self.source.adapter, self.source.config)
        try:
            write_pruned_checkpoint(checkpoint, self.slices, folder, shards=shards, progress=progress,
                                    columns=columns, store=self.columns)  # fmt: skip
        except BaseException:
            with contextlib.suppress(Exception):  # the group may be broken already
                dist.agree(False, "writing shards")
            raise
        dist.agree(True, "writing shards")  # raises on every rank if one failed: rank 0 then cleans up
        if dist.is_main:
            finish_checkpoint(checkpoint, self.slices, self.config, folder)
            declare_torch_dtype(folder)


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def describe_as_stored(config, stored: torch.dtype) -> None:
    """Make a streamed output's ``config`` say what its shards hold (the tensors as stored): ``dtype`` the FFN
    weights' stored dtype ``stored``, and no quantization block.

    Serving engines build the model from config.json: its dtype from ``dtype`` (vLLM ``vllm/config/model.py``
    ``_find_dtype``; SGLang ``python/sglang/srt/configs/model_config.py`` ``_get_and_verify_dtype`` takes a
    missing one for float32 and serves float16), quantized layers from ``quantization_config`` (SGLang also reads
    ``compression_config``). A source's config can say otherwise: no dtype, another than its tensors', a stale
    block over float weights (the in-memory writer's ``save_pretrained`` writes the dtype of the model as
    loaded). A ``stored`` dtype that is no float (a quantized checkpoint's integers) leaves the config as it is.
    """
    if stored not in _FLOAT_DTYPES:
        return
    config.dtype = stored
    drop_quantization(config)


def drop_quantization(config) -> None:
    """Remove the quantization blocks serving engines read from ``config`` (``quantization_config``; SGLang also
    ``compression_config``): the output's tensors are float ones."""
    for key in ("quantization_config", "compression_config"):
        if key in vars(config):
            delattr(config, key)


def writer_for(source: Source, columns: ColumnStore | None = None) -> ModelWriter | ShardWriter:
    """The writer of ``source``'s kind; ``columns``: the refitted out-projection columns it writes (and
    releases on :meth:`~_Writer.close`), ``None`` for the sliced ones."""
    kind = ShardWriter if isinstance(source, CheckpointStream) else ModelWriter
    return kind(source, columns)
