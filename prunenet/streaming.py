"""Streaming compression: prune a sharded safetensors checkpoint without instantiating the model.

PruneNet never needs the whole model in memory: training reads one FFN state matrix per layer,
and the pruned checkpoint differs from the source only in its FFN tensors. This module provides

* :class:`CheckpointSource`: a Hugging Face folder of ``*.safetensors`` shards (with or without
  ``model.safetensors.index.json``), read tensor by tensor;
* :class:`CheckpointStates`: the per-layer state matrices of such a checkpoint as a lazy
  sequence for :func:`prunenet.train.train_policy` (held on the device, in host memory, or read
  from disk on every access, as a :class:`MemoryPlan` decides, with the next layer read ahead);
* :func:`plan_memory`: that decision, from a byte budget (``--max-memory``), for the policy's
  training; :func:`plan_forward`: where the blocks of a model that runs forward live (self-calibration);
* :func:`write_pruned_checkpoint`: the pruned checkpoint, shard by shard: FFN tensors (and, with
  ``--modules ffn+attn``, the attention projections) gathered to what they keep as they are read
  (:data:`Slices`), every other tensor's bytes copied unchanged; :func:`finish_checkpoint`: index and
  config rewritten, tokenizer and other small files copied. Each finished shard is renamed into
  place, so a run killed half-way can be resumed (see :func:`resume_key`).

Peak host memory is about one FFN tensor plus the policy and its optimiser state (or, running the
model, one block and the probes' activations), whatever the model's size.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from .adapters import ModelAdapter, NeuronTensor
from .ops import gram_side, keeps_full_grams
from .progress import progress_bar
from .reward import CHUNK_BYTES, StateSequence
from .safetensors_io import (
    SafetensorsFormatError,
    StreamingWriter,
    TensorEntry,
    TensorSpec,
    read_chunks,
    read_header,
    read_tensor,
)
from .slicing import slice_experts_, slice_ffn_, validate_keeps
from .tables import format_bytes
from .validate import check_finite

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files of the source folder that the writer regenerates or must not copy (weights in other formats
# would be stale: they still have the old FFN width; prunenet's own files describe the source's pruning).
_NOT_COPIED = re.compile(
    r".*\.(safetensors|bin|pt|pth|ckpt|gguf|h5|msgpack|onnx)$|^config\.json$|^prunenet\.json$|^" + re.escape(INDEX_FILE)
)
# Python, torch and transformers themselves, on top of the tensors a plan counts (measured: ~0.45 GB RSS
# after `import transformers` with torch 2.13 on Linux). Only host (CPU) budgets include it.
RUNTIME_BYTES = 512 << 20
# Running the model adds transformers' modeling code and accelerate (0.45 GB RSS once the offloaded model is
# built) and what the allocator keeps from the forward passes' temporaries (a 6-block model peaked at
# 0.63 GiB in all). Only host (CPU) budgets include it.
FORWARD_RUNTIME_BYTES = 640 << 20


class CheckpointError(ValueError):
    """The folder is not a usable safetensors checkpoint for streaming (the CLI prints it in one line)."""


class CheckpointUnreadable(CheckpointError):
    """A weight file cannot be read at all (permissions, not a regular file): not a damaged one."""


def free_memory(device: str | torch.device) -> int:
    """Bytes available on ``device`` now: ``MemAvailable`` on CPU, free GPU memory on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def bound_heap_growth() -> None:
    """Make glibc's allocator hand blocks of 1 MiB and more back to the system as soon as they are freed.

    By default glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB); blocks
    below it then come from the heap, and a freed one stays in the process. A streamed run allocates and
    frees many such blocks (states, Gram matrices): on Qwen3-30B-A3B's shape (2 blocks, 256 experts,
    ``--max-memory 3GiB``, a 1.71 GB plan) the peak resident memory grew to 3.15 GB; with the threshold
    fixed at 1 MiB (which also stops the adjustment) it was 1.75 GB. Nothing happens without glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3  # malloc.h
    mallopt(m_mmap_threshold, 1 << 20)


# -- reading ------------------------------------------------------------------------------------


class CheckpointSource:
    """A model folder's safetensors weights, read one tensor at a time.

    Args:
        folder: a Hugging Face model folder: ``config.json`` plus ``model.safetensors``, or shards
            listed in ``model.safetensors.index.json`` (any ``*.safetensors`` files otherwise).

    Raises:
        CheckpointError: no safetensors weights, an index naming missing files or tensors, a
            tensor in two shards, or a malformed shard.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        self.index: dict | None = None
        if index.is_file():
            try:
                self.index = json.loads(index.read_text())
                weight_map = self.index["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a safetensors index: {err!r}") from None
            names = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).is_file():
            names, weight_map = [SINGLE_FILE], None
        else:
            names, weight_map = sorted(p.name for p in self.folder.glob("*.safetensors")), None
        if not names:
            raise CheckpointError(f"{self.folder} has no *.safetensors weights to stream")
        self.shards: list[Path] = []
        self.entries: dict[str, TensorEntry] = {}
        self.shard_entries: dict[str, list[str]] = {}  # shard file name -> its tensors, in file order
        self.metadata: dict[str, dict[str, str]] = {}
        self.finite: set[str] = set()  # tensors found finite: each is read at least once, checked once
        for name in names:
            path = self.folder / name
            if not path.is_file():
                if path.exists():  # a FIFO or a device (/dev/zero linked in): reading it would never end
                    raise CheckpointUnreadable(f"{path} is not a regular file (a FIFO, a device or a folder?)")
                if os.path.lexists(path):
                    raise CheckpointUnreadable(f"{path} is a broken symbolic link")
                raise CheckpointError(f"{INDEX_FILE} lists {name}, which is missing from {self.folder}")
            try:
                entries, metadata = read_header(path)
            except SafetensorsFormatError as err:
                raise CheckpointError(str(err)) from None
            except OSError as err:
                raise CheckpointUnreadable(f"cannot read {path}: {(err.strerror or str(err)).lower()}") from None
            for tensor in entries:
                if tensor in self.entries:
                    raise CheckpointError(f"tensor {tensor!r} is in both {self.entries[tensor].path.name} and {name}")
            self.shards.append(path)
            self.entries.update(entries)
            self.shard_entries[name] = list(entries)
            self.metadata[name] = metadata
        if weight_map is not None:
            for tensor, shard in weight_map.items():
                entry = self.entries.get(tensor)
                if entry is None or entry.path.name != shard:
                    raise CheckpointError(f"{INDEX_FILE} puts {tensor!r} in {shard}, but that shard does not hold it")

    @staticmethod
    def has_safetensors(folder: str | os.PathLike) -> bool:
        """Whether ``folder`` holds safetensors weights (streaming is possible)."""
        return any(Path(folder).glob("*.safetensors"))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"the checkpoint in {self.folder} has no tensor {name!r}") from None

    def read(self, name: str, file=None) -> torch.Tensor:
        """Tensor ``name`` as a new CPU tensor in its stored dtype, checked finite (``file``: its shard, open).

        Raises:
            ValueError: it holds NaN or infinity (:func:`~prunenet.validate.check_finite`).
        """
        tensor = read_tensor(self.entry(name), file)
        if name not in self.finite:
            check_finite(tensor, name)
            self.finite.add(name)
        return tensor

    def check_finite(self, names: Sequence[str] | None = None, file=None) -> None:
        """The finiteness rule for tensors that are copied, not loaded: each of ``names`` (default all) not
        checked yet is read in 16 MiB pieces and summed (:func:`~prunenet.validate.check_finite`).

        Reading the bytes costs no second read from the disk: the copy that follows takes them from the page
        cache. Measured on the embedded SmolLM2-135M (513 MiB, 2 CPU cores, page cache warm): 0.13 s, a
        streamed ``--method random`` run 0.66 -> 0.71 s. ``file``: the one shard all ``names`` are in, open.
        """
        for name in self.entries if names is None else names:
            entry = self.entries[name]
            if name not in self.finite and entry.dtype.is_floating_point:
                check_finite(read_chunks(entry, file), name)
            self.finite.add(name)

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors."""
        return sum(e.nbytes for e in self.entries.values())

    def numel(self) -> int:
        """Elements of all tensors (the parameter count, as stored: tied weights count once)."""
        return sum(e.numel for e in self.entries.values())

    def check_against_config(self, adapter: ModelAdapter, config) -> None:
        """Check that ``config`` describes this checkpoint before any work: as many blocks, every FFN tensor
        present with the shape the config's sizes give (:meth:`ffn_tensors`).

        Raises:
            CheckpointError: one line naming the ``config.json`` field and what the checkpoint holds.
        """
        layers = adapter.num_layers(config)
        # Every dotted prefix of every name ("model.", "model.layers.", "model.layers.0.", ...): one pass,
        # however large the config's block count.
        prefixes = {name[: i + 1] for name in self.entries for i, c in enumerate(name) if c == "."}
        stored = 0
        while adapter.checkpoint_prefix(stored) in prefixes:
            stored += 1
        if stored != layers:
            raise CheckpointError(
                f"config.json: {adapter.config_field(config, 'num_hidden_layers')} is {layers}, but the checkpoint in "
                f"{self.folder} holds {stored} blocks ({adapter.checkpoint_prefix('N')}*)"
            )
        self.ffn_tensors(adapter, config)

    def ffn_tensors(self, adapter: ModelAdapter, config) -> dict[str, tuple[int | None, int, NeuronTensor]]:
        """``{name: (unit, layer, spec)}`` of every neuron-indexed FFN tensor in the checkpoint, as stored
        (``unit`` is ``None`` for a fused tensor of all a block's experts).

        Raises:
            CheckpointError: a required tensor is missing, or its shape is not what the config's sizes make it:
                ``groups * ffn_width`` on the neuron axis, ``hidden_size`` on the other, experts first if fused.
        """
        width, hidden, experts = adapter.ffn_width(config), adapter.hidden_size(config), adapter.num_experts(config)
        found = {}
        for layer in range(adapter.num_layers(config)):
            for name, spec, unit in adapter.stored_tensors(layer, config):
                if name not in self.entries:
                    if spec.optional:
                        continue
                    raise CheckpointError(
                        f"the checkpoint in {self.folder} has no tensor {name!r} (expected by the "
                        f"{type(adapter).__name__} for model_type {config.model_type!r})"
                    )
                shape = self.entries[name].shape
                # One FFN's tensor is an (n, d) or (d, n) weight or an (n,) bias; a fused one has E experts first.
                dims = [spec.groups * width] if len(shape) - spec.experts == 1 else [hidden, hidden]
                dims[spec.axis] = spec.groups * width
                expected = (experts,) * spec.experts + tuple(dims)
                if shape != expected:
                    sizes = [(adapter.width_attr, width), ("hidden_size", hidden)]
                    sizes += [(adapter.experts_attr, experts)] if spec.experts else []
                    described = ", ".join(f"{adapter.config_field(config, attr)} {value}" for attr, value in sizes)
                    raise CheckpointError(
                        f"{name} has shape {shape} in the checkpoint, but config.json ({described}) makes it {expected}"
                    )
                found[name] = (unit, layer, spec)
        return found

    def state_dtype(self, adapter: ModelAdapter, config) -> torch.dtype:
        """Stored dtype of the first in-projection (what the state matrices are made of)."""
        return self.entry(adapter.stored_tensors(0, config)[0][0]).dtype


class CheckpointStates(StateSequence):
    """The ``L`` state matrices ``(n, d)`` of a checkpoint, loaded on access.

    Args:
        source: the checkpoint.
        adapter, config: which tensors are the state matrices, and ``n``.
        device: where items are returned.
        residency: ``"device"``: all loaded once and kept on ``device``; ``"host"``: kept in host
            memory (pinned when ``device`` is CUDA) and copied per access; ``"disk"``: read from
            the checkpoint on every access, the next layer read ahead on a background thread while
            the caller works on this one.
        layers: the layers that will be accessed, in order (a distributed rank's own; default all):
            what is read ahead.
    """

    def __init__(
        self,
        source: CheckpointSource,
        adapter: ModelAdapter,
        config,
        device: str | torch.device = "cpu",
        residency: str = "disk",
        layers: Sequence[int] | None = None,
    ):
        if residency not in ("device", "host", "disk"):
            raise ValueError(f"residency must be device, host or disk, got {residency!r}")
        self.source, self.adapter = source, adapter
        self.width = adapter.ffn_width(config)
        # Unit i's first in-projection: its own tensor, or expert `index` of a fused one.
        experts = adapter.num_experts(config)
        self.units: list[tuple[str, NeuronTensor, int | None]] = []
        for layer in range(adapter.num_layers(config)):
            name, spec, unit = adapter.stored_tensors(layer, config)[0]
            if unit is None:
                self.units += [(name, spec, e) for e in range(experts)]
            else:  # one tensor per unit: the layer's first `experts` entries are the first in-projections
                self.units += [(n, sp, None) for n, sp, _ in adapter.stored_tensors(layer, config)[:experts]]
        self.names = [name for name, _, _ in self.units]
        first = source.entry(self.names[0])
        shape = first.shape[1:] if self.units[0][2] is not None else first.shape
        self.shape = tuple(adapter.state_matrix(torch.empty(shape, device="meta"), self.width, self.units[0][1]).shape)
        self.dtype = first.dtype
        self.device = torch.device(device)
        self.residency = residency
        self._cache: list[torch.Tensor | None] = [None] * len(self.names)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prunenet-read")
        self._ahead: tuple[int, concurrent.futures.Future] | None = None
        order = list(range(len(self.names)) if layers is None else layers)
        self._next = {layer: order[(j + 1) % len(order)] for j, layer in enumerate(order)}

    def __len__(self) -> int:
        return len(self.names)

    def _read(self, i: int) -> torch.Tensor:
        """Unit ``i``'s state matrix on the host (a view of its first in-projection, as stored)."""
        name, spec, expert = self.units[i]
        tensor = self.source.read(name)
        if expert is not None:  # a fused tensor of every expert: keep this one's (a copy frees the rest)
            tensor = tensor[expert].clone()
        state = self.adapter.state_matrix(tensor, self.width, spec)
        if self.residency == "host" and self.device.type == "cuda":
            state = state.pin_memory()
        return state

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        if self.residency != "disk":
            if self._cache[i] is None:
                host = self._read(i)
                self._cache[i] = host.to(self.device) if self.residency == "device" else host
            return self._cache[i].to(self.device, non_blocking=True)
        if self._ahead is not None and self._ahead[0] == i:
            state = self._ahead[1].result()
        else:
            state = self._read(i)
        # Read the next layer while the caller computes on this one (file reads release the GIL).
        nxt = self._next.get(i, (i + 1) % len(self))
        self._ahead = (nxt, self._pool.submit(self._read, nxt))
        return state.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the read-ahead thread and drop cached matrices."""
        self._ahead = None
        self._pool.shutdown(wait=True)
        self._cache = [None] * len(self.names)


# -- memory plan --------------------------------------------------------------------------------


@dataclasses.dataclass
class MemoryPlan:
    """Where training keeps its large tensors, from a byte budget.

    Attributes:
        budget: the budget in bytes (``--max-memory``, default: what the device has free).
        device: the training device.
        states: ``"device"``, ``"host"`` or ``"disk"`` (see :class:`CheckpointStates`).
        grams: ``"device"`` (in memory), ``"disk"`` (a temporary file; see
            :class:`prunenet.reward.SpilledGrams`) or ``"none"`` (this ``k`` does not use them).
        fixed_bytes: policy, optimiser, one layer's working set (and, on CPU, the runtime).
        state_bytes: all state matrices as stored; ``gram_bytes``: all their full Gram matrices in float32
            (``W^T W``, or ``W W^T`` for states with ``n <= d``).
        estimate: the plan's estimated peak on the device.
    """

    budget: int
    device: str
    states: str
    grams: str
    fixed_bytes: int
    state_bytes: int
    gram_bytes: int
    estimate: int

    def describe(self) -> str:
        where = {"device": f"in {self.device} memory", "host": "in pinned host memory", "disk": "read from disk"}
        gram = {"device": f"in {self.device} memory", "disk": "in a temporary file", "none": "not needed at this ratio"}
        text = (
            f"memory plan (budget {format_bytes(self.budget)} on {self.device}): state matrices "
            f"({format_bytes(self.state_bytes)}) {where[self.states]}; Gram matrices "
            f"({format_bytes(self.gram_bytes)}) {gram[self.grams]}; policy, optimiser and one layer's work "
            f"{format_bytes(self.fixed_bytes)}; estimated peak {format_bytes(self.estimate)}"
        )
        if self.estimate > self.budget:
            text += " -- ABOVE the budget: this is the least this model needs"
        return text


def plan_memory(
    num_layers: int,
    n: int,
    d: int,
    itemsize: int,
    k: int,
    budget: int,
    device: str | torch.device = "cpu",
    backend: str = "torch",
) -> MemoryPlan:
    """Choose where the state matrices and their full Gram matrices live during training.

    The estimate counts the policy (``P = (n d + 2 n)`` float32) five times (parameters, gradients, two
    AdamW moments, the best policy so far), one layer's working set (the state as stored and read
    ahead, its float32 copy kept for the backward pass, the gathered rows, three Gram matrices, and
    the set-up's chunk of them),
    and on CPU the runtime itself. States go on the device when they fit, then in host memory (CUDA
    only), else they are read from disk; the Gram matrices stay in memory when they still fit, else they are
    spilled to a file. Every choice gives bit-identical results. ``backend`` (the resolved reward
    backend) decides whether the full Gram matrices are needed at all (:func:`prunenet.ops.keeps_full_grams`).
    """
    device = torch.device(device)
    policy = (n * d + 2 * n) * 4
    rows = max(k, n - k) * d * 4
    size = n if gram_side(n, d) == "rows" else d  # the Gram matrices are size x size
    gram = size * size * 4
    fixed = 5 * policy + 2 * n * d * itemsize + n * d * 4 + rows + 3 * gram
    fixed += min(num_layers, max(1, CHUNK_BYTES // gram)) * gram  # a chunk of Gram matrices (set-up)
    if device.type == "cpu":
        fixed += RUNTIME_BYTES
    state_bytes = num_layers * n * d * itemsize
    gram_bytes = num_layers * gram if keeps_full_grams(n, d, k, backend) else 0
    left = budget - fixed
    if state_bytes <= left:
        states, left = "device", left - state_bytes
    elif device.type == "cuda" and state_bytes <= free_memory("cpu") - RUNTIME_BYTES:
        states = "host"
    else:
        states = "disk"
    if not gram_bytes:
        grams = "none"
    elif gram_bytes <= left:
        grams, left = "device", left - gram_bytes
    else:
        grams = "disk"
    estimate = fixed + (state_bytes if states == "device" else 0) + (gram_bytes if grams == "device" else 0)
    return MemoryPlan(budget, str(device), states, grams, fixed, state_bytes, gram_bytes, estimate)


@dataclasses.dataclass
class ForwardPlan:
    """Where a model that runs forward on a budget keeps its blocks (self-calibration on a checkpoint).

    Attributes:
        budget: the budget in bytes; device: where the model runs.
        blocks: ``"device"`` (every block on the device), ``"host"`` (in host memory, each moved to the
            CUDA device while it runs) or ``"disk"`` (each read from the checkpoint while it runs).
        resident_bytes: what stays on the device: embeddings, final norm, head (and, on CPU, the runtime).
        block_bytes: the largest block; kv_bytes: the key/value cache of the probe batch at full length;
        activation_bytes: the largest activations of one block on the probe batch, and the logits.
        estimate: the plan's estimated peak on the device.
    """

    budget: int
    device: str
    blocks: str
    resident_bytes: int
    block_bytes: int
    kv_bytes: int
    activation_bytes: int
    estimate: int

    def describe(self) -> str:
        where = {"device": f"all in {self.device} memory", "host": "in host memory, each moved to the device to run",
                 "disk": "read from the checkpoint as each runs"}  # fmt: skip
        parts = [
            f"forward plan (budget {format_bytes(self.budget)} on {self.device}): blocks",
            f"({format_bytes(self.block_bytes)} the largest) {where[self.blocks]};",
            f"embeddings, head and runtime {format_bytes(self.resident_bytes)};",
            f"KV cache {format_bytes(self.kv_bytes)}; activations {format_bytes(self.activation_bytes)};",
            f"estimated peak {format_bytes(self.estimate)}",
        ]
        return " ".join(parts)


def plan_forward(source: CheckpointSource, adapter: ModelAdapter, config, budget: int, device: str | torch.device,
                 sequences: int, length: int) -> ForwardPlan:  # fmt: skip
    """Choose where the blocks of a model run forward on ``sequences x length`` probe tokens live.

    The estimate counts what stays on the device (every tensor outside the blocks: embeddings, final
    norm, head), one block and a copy of its largest tensor (a matmul may repack a weight), the key/value
    cache of the batch at full length, the largest activations of a block (hidden states and the FFN's
    ``n``-wide ones, attention scores), the float64 copies the statistics hooks make of the ``n``-wide
    activations, and the logits of one decoding step, plus on CPU the runtime. Blocks all go on the
    device when they fit, else in host memory (CUDA only), else they are read from the checkpoint as each
    runs. Measured on the LLaMA-2-7B shape (fp16, 8 x 128 probes, CPU): 2.19 GiB peak for a 2.36 GiB
    estimate (``benchmarks/bench_large.py --method selfcal``).

    Raises:
        ValueError: the budget cannot hold even one block with the rest.
    """
    device = torch.device(device)
    layers = adapter.num_layers(config)
    prefixes = [adapter.checkpoint_prefix(i) for i in range(layers)]
    block_bytes, largest = [0] * layers, 0
    resident = 0
    for name, entry in source.entries.items():
        owner = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
        if owner is None:
            resident += entry.nbytes
        else:
            block_bytes[owner] += entry.nbytes
            largest = max(largest, entry.nbytes)
    itemsize = source.state_dtype(adapter, config).itemsize
    d, n = adapter.hidden_size(config), adapter.ffn_width(config)
    text = adapter.text_config(config)
    heads = int(getattr(text, "num_attention_heads", 1))
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or d // heads)
    vocab = int(getattr(text, "vocab_size", 0))
    length = adapter.capped_length(config, length)
    kv = layers * 2 * sequences * kv_heads * length * head_dim * itemsize
    tokens = sequences * length
    activations = (
        tokens * (4 * d + 3 * n) * itemsize  # hidden states, the FFN's n-wide activations
        + tokens * n * 8 * 2  # the statistics hooks' float64 copy and its square
        + sequences * heads * length * length * 4  # attention scores
        + 3 * sequences * vocab * 4  # one decoding step's logits, in float32, and their softmax
        + largest  # a repacked copy of the largest weight
    )
    if device.type == "cpu":
        resident += FORWARD_RUNTIME_BYTES
    fixed = resident + kv + activations
    total_blocks = sum(block_bytes)
    if fixed + total_blocks <= budget:
        blocks, estimate = "device", fixed + total_blocks
    else:
        if fixed + max(block_bytes) > budget:
            raise ValueError(
                f"--max-memory {format_bytes(budget)} cannot run this model one block at a time: it needs at least "
                f"{format_bytes(fixed + max(block_bytes))} (embeddings, head and runtime {format_bytes(resident)}, one "
                f"block {format_bytes(max(block_bytes))}, KV cache {format_bytes(kv)}, activations "
                f"{format_bytes(activations)}); raise --max-memory or lower --probe-sequences / --probe-length"
            )
        host_free = free_memory("cpu") - RUNTIME_BYTES
        blocks = "host" if device.type == "cuda" and total_blocks <= host_free else "disk"
        estimate = fixed + max(block_bytes)
    return ForwardPlan(budget, str(device), blocks, resident, max(block_bytes), kv, activations, estimate)


# -- writing ------------------------------------------------------------------------------------


Slices = dict[str, tuple[int, torch.Tensor, int]]
"""``{tensor name: (axis, keep, width)}``: along ``axis``, every ``width``-long group of entries keeps the
entries ``keep`` (sorted). An FFN tensor keeps its kept neurons (``width`` = FFN width; a fused projection
has several groups); an attention projection keeps the rows of its kept KV groups (one group). A fused
tensor of ``E`` experts has a 2-D ``keep`` ``(E, k)``: expert ``e`` keeps ``keep[e]``."""


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


def attention_slices(source: CheckpointSource, adapter: ModelAdapter, config, kept_groups) -> Slices:
    """What the attention projections keep for the KV groups ``kept_groups`` (sorted ``(m,)`` per layer):
    the rows of ``q``/``k``/``v`` (weights and biases) and the columns of ``o``'s weight."""
    from .attention import attention_shape, group_entries

    spec, shape = adapter.attention, attention_shape(config)
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


def resume_key(source: CheckpointSource, slices: Slices) -> str:
    """A digest of everything the written tensors depend on: the source shards and what each tensor keeps.

    The streaming writer's temporary folder is named after it, so a run killed half-way (power
    loss, ``SIGKILL``) and started again with the same inputs finds its finished shards and skips
    them; a run with other inputs never mistakes another's shards for its own.
    """
    h = hashlib.sha256()
    for path in source.shards:
        stat = path.stat()
        h.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    for name in sorted(slices):
        axis, keep, width = slices[name]
        h.update(f"{name}:{axis}:{width}:".encode())
        h.update(keep.to(torch.int64).numpy().tobytes())
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


def write_shard(source: CheckpointSource, shard: str, folder: Path, slices: Slices, progress_bar=None) -> int:
    """Write the pruned version of source shard ``shard`` into ``folder``; returns its tensor bytes.

    Sliced tensors are read one at a time, compacted in place to what they keep
    (:func:`prunenet.slicing.slice_ffn_`: the native op's few MiB of scratch, or one ``index_select``)
    and written; every other tensor's bytes are copied file to file (``copy_file_range``), so they
    are bit-identical. The shard is written as ``NAME.partial`` and renamed when complete and synced.
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
                writer.write(spec.name, tensor)
                del tensor
            else:  # checked finite as it passes (a failure leaves NAME.partial, never NAME)
                source.check_finite([spec.name], src)
                writer.copy_from(spec.name, entry, src)
            if progress_bar is not None:
                progress_bar.update(entry.nbytes)
    os.replace(partial, final)
    return sum(s.nbytes for s in specs)


def write_pruned_checkpoint(
    source: CheckpointSource,
    slices: Slices,
    folder: str | os.PathLike,
    *,
    shards: Sequence[str] | None = None,
    progress: bool = True,
) -> None:
    """Write the shards of the checkpoint pruned as ``slices`` says into ``folder`` (an existing, private
    temporary folder); :func:`finish_checkpoint` then writes the files around them.

    Args:
        source: the dense checkpoint.
        slices: what each sliced tensor keeps (:func:`ffn_slices`, :func:`attention_slices`).
        shards: write only these source shards (default: all); distributed runs split them.
    """
    folder = Path(folder)
    names = list(source.shard_entries) if shards is None else list(shards)
    total = sum(source.entries[t].nbytes for s in names for t in source.shard_entries[s])
    with progress_bar(total=total, unit="B", unit_scale=True, desc="writing shards", enabled=progress) as bar:
        for shard in names:
            write_shard(source, shard, folder, slices, bar)


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
