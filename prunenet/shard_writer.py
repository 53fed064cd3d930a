"""Writing a pruned checkpoint shard by shard: each sliced tensor gathered as it is read, every other copied.

What each tensor keeps is a :data:`Slices` (:func:`ffn_slices` for the FFN tensors, :func:`attention_slices`
for the attention projections with ``--modules ffn+attn``). :func:`write_pruned_checkpoint` writes the
source's shards with those tensors compacted in place (:func:`prunenet.slicing.slice_ffn_`), the out-projections'
kept columns replaced by refitted ones where compensation gave them (:data:`Columns`), and every other
tensor's bytes copied unchanged; :func:`finish_checkpoint` writes the index and config around them and
copies the tokenizer and other small files. Each finished shard is renamed into place, so a run killed
half-way can be resumed (see :func:`resume_key`). Peak host memory is about one sliced tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from .adapters import ModelAdapter
from .compensation import ColumnStore, replace_columns_
from .progress import progress_bar
from .safetensors_io import SafetensorsFormatError, StreamingWriter, TensorSpec, read_header
from .slicing import slice_experts_, slice_ffn_, validate_keeps
from .streaming import INDEX_FILE, CheckpointSource

log = logging.getLogger(__name__)

# Files of the source folder that the writer regenerates or must not copy (weights in other formats
# would be stale: they still have the old FFN width; prunenet's own files describe the source's pruning;
# hf_quant_config.json describes a quantized checkpoint, which SGLang reads beside config.json
# (python/sglang/srt/configs/model_config.py, _parse_quant_hf_config): the shards written are float ones).
_NOT_COPIED = re.compile(
    r".*\.(safetensors|bin|pt|pth|ckpt|gguf|h5|msgpack|onnx)$|^config\.json$|^prunenet\.json$|^hf_quant_config\.json$|^"
    + re.escape(INDEX_FILE)
)


Slices = dict[str, tuple[int, torch.Tensor, int]]
"""``{tensor name: (axis, keep, width)}``: along ``axis``, every ``width``-long group of entries keeps the
entries ``keep`` (sorted). An FFN tensor keeps its kept neurons (``width`` = FFN width; a fused projection
has several groups); an attention projection keeps the rows of its kept KV groups (one group). A fused
tensor of ``E`` experts has a 2-D ``keep`` ``(E, k)``: expert ``e`` keeps ``keep[e]``."""


Columns = dict[str, tuple[int, list[int]]]
"""``{out-projection tensor name: (axis, units)}``: the tensors whose kept columns are replaced by the refitted
ones of a :class:`~prunenet.compensation.ColumnStore` (:func:`out_columns`). ``axis`` is the neuron axis within
one unit's matrix; ``units`` the FFN units the tensor holds: one, or a fused tensor's ``E`` experts along its
leading axis (``(E, d, n)`` / ``(E, n, d)``)."""


def ffn_slices(source: CheckpointSource, adapter: ModelAdapter, config, keeps: Sequence[torch.Tensor]) -> Slices:
    """What every neuron-indexed FFN tensor of the checkpoint keeps, for ``keeps`` (one ``(k,)`` per FFN unit).

    A fused tensor of a block's ``E`` experts keeps the ``(E, k)`` stack of their vectors along its stored axis.
    """
    width = adapter.ffn_width(config)
    validate_keeps(keeps, adapter.num_units(config), width)
    experts = adapter.num_experts(config)
    slices: Slices = {}
    for name, (unit, layer, spec) in source.ffn_tensors(adapter, config).items():
        keep = keeps[unit] if unit is not None else torch.stack(list(keeps[layer * experts : (layer + 1) * experts]))
        slices[name] = (spec.stored_axis, keep, width)
    return slices


def out_columns(source: CheckpointSource, adapter: ModelAdapter, config) -> Columns:
    """Every out-projection weight of the checkpoint, as stored, and the FFN units whose columns it holds."""
    experts = adapter.num_experts(config)
    columns: Columns = {}
    for name, (unit, layer, spec) in source.ffn_tensors(adapter, config).items():
        if spec.role == "out" and not name.endswith("bias"):
            units = [unit] if unit is not None else list(range(layer * experts, (layer + 1) * experts))
            columns[name] = (spec.axis, units)
    return columns


def attention_slices(source: CheckpointSource, adapter: ModelAdapter, config, kept_groups) -> Slices:
    """What the attention projections keep for the KV groups ``kept_groups`` (sorted ``(m,)`` per layer):
    the rows of ``q``/``k``/``v`` (weights and biases) and the columns of ``o``'s weight."""
    from .attention import group_entries

    spec, shape = adapter.attention, adapter.attention_shape(config)
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    slices: Slices = {}
    for layer, groups in enumerate(kept_groups):
        q_rows, kv_rows = group_entries(groups, shape)
        prefix = adapter.checkpoint_prefix(layer)
        projections = ((spec.q, 0, q_rows, q_width), (spec.k, 0, kv_rows, kv_width), (spec.v, 0, kv_rows, kv_width))
        for module, axis, rows, width in projections:
            for param in ("weight", "bias"):
                if f"{prefix}{module}.{param}" in source:
                    slices[f"{prefix}{module}.{param}"] = (axis, rows, width)
        slices[f"{prefix}{spec.o}.weight"] = (1, q_rows, q_width)  # its bias is (d,): untouched
    return slices


def resume_key(source: CheckpointSource, slices: Slices, columns_digest: str | None = None) -> str:
    """A digest of everything the written tensors depend on: the source shards, what each tensor keeps and the
    refitted columns written over the out-projections (``columns_digest``: their
    :attr:`~prunenet.compensation.ColumnStore.digest`; ``None`` without compensation).

    The streaming writer's temporary folder is named after it, so a run killed half-way (power
    loss, ``SIGKILL``) and started again with the same inputs finds its finished shards and skips
    them; a run with other inputs (other columns included: another --damping, other probes) never mistakes
    another's shards for its own.
    """
    h = hashlib.sha256()
    for path in source.shards:
        stat = path.stat()
        h.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    for name in sorted(slices):
        axis, keep, width = slices[name]
        h.update(f"{name}:{axis}:{width}:".encode())
        h.update(keep.to(torch.int64).numpy().tobytes())
    if columns_digest is not None:
        h.update(f"columns:{columns_digest}\n".encode())
    return h.hexdigest()[:16]


def _output_specs(source: CheckpointSource, shard: str, slices: Slices) -> list[TensorSpec]:
    specs = []
    for name in source.shard_entries[shard]:
        entry = source.entries[name]
        shape = list(entry.shape)
        if name in slices:
            axis, keep, width = slices[name]
            shape[axis] = shape[axis] // width * keep.shape[-1]
        specs.append(TensorSpec(name, entry.dtype, tuple(shape)))
    return specs


def _shard_is_complete(path: Path, specs: list[TensorSpec]) -> bool:
    """Whether ``path`` is a finished shard with exactly these tensors (a resumed run keeps it)."""
    try:
        entries, _ = read_header(path)
    except (SafetensorsFormatError, OSError):
        return False
    return [(n, e.dtype, e.shape) for n, e in entries.items()] == [(s.name, s.dtype, s.shape) for s in specs]


def write_shard(source: CheckpointSource, shard: str, folder: Path, slices: Slices, progress_bar=None,
                columns: Columns | None = None, store: ColumnStore | None = None) -> int:  # fmt: skip
    """Write the pruned version of source shard ``shard`` into ``folder``; returns its tensor bytes.

    Sliced tensors are read one at a time, compacted in place to what they keep
    (:func:`prunenet.slicing.slice_ffn_`: the native op's few MiB of scratch, or one ``index_select``)
    and written; every other tensor's bytes are copied file to file (``copy_file_range``), so they
    are bit-identical. An out-projection in ``columns`` then gets each of its units' refitted columns ``(d, k)``
    from ``store`` in place of its sliced ones. The shard is written as ``NAME.partial`` and renamed when
    complete and synced.
    """
    specs = _output_specs(source, shard, slices)
    final = folder / shard
    if final.exists() and _shard_is_complete(final, specs):  # checked finite when it was written
        log.info("resuming: %s was already written", shard)
        if progress_bar is not None:
            progress_bar.update(sum(source.entries[s.name].nbytes for s in specs))
        return sum(s.nbytes for s in specs)
    partial = folder / (shard + ".partial")
    with open(source.folder / shard, "rb") as src, StreamingWriter(partial, specs, source.metadata[shard]) as writer:
        for spec in specs:
            entry = source.entries[spec.name]
            if spec.name in slices:
                axis, keep, width = slices[spec.name]
                tensor = source.read(spec.name, src)  # checked finite
                if keep.dim() == 2:  # fused experts: (E, g*n, d) / (E, g*n) rows or (E, d, g*n) columns
                    rows, cols = ([tensor], []) if axis == 1 else ([], [tensor])
                    slice_experts_(rows, cols, keep, width)
                else:
                    rows, cols = ([tensor], []) if axis == 0 else ([], [tensor])
                    slice_ffn_(rows, cols, keep, width)
                if columns is not None and spec.name in columns:
                    _replace_columns(tensor, *columns[spec.name], store)
                writer.write(spec.name, tensor)
                del tensor
            else:  # checked finite as it passes (a failure leaves NAME.partial, never NAME)
                source.check_finite([spec.name], src)
                writer.copy_from(spec.name, entry, src)
            if progress_bar is not None:
                progress_bar.update(entry.nbytes)
    os.replace(partial, final)
    return sum(s.nbytes for s in specs)


def _replace_columns(tensor: torch.Tensor, axis: int, units: list[int], store: ColumnStore) -> None:
    """Overwrite the sliced out-projection ``tensor`` (one unit's ``(d, k)`` / ``(k, d)``, or ``E`` experts'
    stacked first) with its units' refitted columns from ``store``."""
    if len(units) == 1 and tensor.dim() == 2:
        replace_columns_(tensor, store.get(units[0]), axis)
        return
    for expert, unit in enumerate(units):
        replace_columns_(tensor[expert], store.get(unit), axis)


def write_pruned_checkpoint(
    source: CheckpointSource,
    slices: Slices,
    folder: str | os.PathLike,
    *,
    shards: Sequence[str] | None = None,
    progress: bool = True,
    columns: Columns | None = None,
    store: ColumnStore | None = None,
) -> None:
    """Write the shards of the checkpoint pruned as ``slices`` says into ``folder`` (an existing, private
    temporary folder); :func:`finish_checkpoint` then writes the files around them.

    Args:
        source: the dense checkpoint.
        slices: what each sliced tensor keeps (:func:`ffn_slices`, :func:`attention_slices`).
        shards: write only these source shards (default: all); distributed runs split them.
        columns, store: the out-projections whose kept columns are replaced (:func:`out_columns`) and the
            refitted columns (``--compensate``); ``None`` leaves the sliced columns as they are.
    """
    if (columns is None) != (store is None):
        raise TypeError("write_pruned_checkpoint: pass both columns= and store=, or neither")
    folder = Path(folder)
    names = list(source.shard_entries) if shards is None else list(shards)
    total = sum(source.entries[t].nbytes for s in names for t in source.shard_entries[s])
    with progress_bar(total=total, unit="B", unit_scale=True, desc="writing shards", enabled=progress) as bar:
        for shard in names:
            write_shard(source, shard, folder, slices, bar, columns, store)


def pruned_numel(source: CheckpointSource, slices: Slices) -> int:
    """Parameters (stored elements) of the checkpoint pruned as ``slices`` says, as written here."""
    return sum(
        s.nbytes // s.dtype.itemsize for shard in source.shard_entries for s in _output_specs(source, shard, slices)
    )


def finish_checkpoint(source: CheckpointSource, slices: Slices, config, folder: Path) -> None:
    """The files around the shards: the index (new ``total_size``), ``config`` (the pruned model's: new FFN
    width, and heads where attention was sliced), and every other top-level file of the source (tokenizer,
    generation config, ...) copied."""
    if source.index is not None:
        total = sum(s.nbytes for shard in source.shard_entries for s in _output_specs(source, shard, slices))
        index = {**source.index, "metadata": {**source.index.get("metadata", {}), "total_size": total}}
        with open(folder / INDEX_FILE, "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    config.save_pretrained(folder)
    for path in sorted(source.folder.iterdir()):
        if path.is_file() and not _NOT_COPIED.match(path.name) and not path.name.endswith(".partial"):
            shutil.copy2(path, folder / path.name)
        elif path.is_dir():
            log.info("not copied (a subfolder): %s", path)
