"""Memory budgets of a streamed run: where its large tensors live, and an allocator that keeps to the plan.

``--max-memory`` (default: what the device has free, :func:`free_memory`) bounds a streamed run's peak.
:func:`plan_memory` decides where policy training keeps the state matrices and their Gram matrices
(:class:`MemoryPlan`); :func:`plan_forward` where the blocks of a model that runs forward live
(self-calibration, :class:`ForwardPlan`). Both estimate the peak from the tensors' sizes before any work,
and refuse a budget that cannot hold the least the run needs. :func:`bound_heap_growth` makes the
process's resident memory follow what the plans count.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from .adapters import ModelAdapter
from .compensation import layer_bytes, solve_bytes
from .ops import gram_side, keeps_full_grams
from .reward import CHUNK_BYTES
from .streaming import CheckpointSource
from .tables import format_bytes

# Python, torch and transformers themselves, on top of the tensors a plan counts (measured: ~0.45 GB RSS
# after `import transformers` with torch 2.13 on Linux). Only host (CPU) budgets include it.
RUNTIME_BYTES = 512 << 20
# Running the model adds transformers' modeling code and accelerate (0.45 GB RSS once the offloaded model is
# built) and what the allocator keeps from the forward passes' temporaries (a 6-block model peaked at
# 0.63 GiB in all). Only host (CPU) budgets include it.
FORWARD_RUNTIME_BYTES = 640 << 20


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
        compensation_layers: how many layers' compensation one forward pass accumulates (``--compensate``; 0
            without it): as many as the budget holds beside the rest, each ``compensation_bytes`` (every
            unit's ``H`` and out-projection copy), plus one unit's solve.
        compensation_bytes: one layer's compensation (0 without it).
    """

    budget: int
    device: str
    blocks: str
    resident_bytes: int
    block_bytes: int
    kv_bytes: int
    activation_bytes: int
    estimate: int
    compensation_layers: int = 0
    compensation_bytes: int = 0

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
        if self.compensation_layers:
            parts[-1] += (f"; compensation {self.compensation_layers} layer(s) per pass "
                          f"({format_bytes(self.compensation_bytes)} each)")  # fmt: skip
        return " ".join(parts)


def plan_forward(source: CheckpointSource, adapter: ModelAdapter, config, budget: int, device: str | torch.device,
                 sequences: int, length: int, compensate_k: int | None = None) -> ForwardPlan:  # fmt: skip
    """Choose where the blocks of a model run forward on ``sequences x length`` probe tokens live.

    The estimate counts what stays on the device (every tensor outside the blocks: embeddings, final
    norm, head), one block and a copy of its largest tensor (a matmul may repack a weight), the key/value
    cache of the batch at full length, the largest activations of a block (hidden states and the FFN's
    ``n``-wide ones, attention scores), the float64 copies the statistics hooks make of the ``n``-wide
    activations, and the logits of one decoding step, plus on CPU the runtime. Blocks all go on the
    device when they fit, else in host memory (CUDA only), else they are read from the checkpoint as each
    runs. Measured on the LLaMA-2-7B shape (fp16, 8 x 128 probes, CPU): 2.19 GiB peak for a 2.36 GiB
    estimate (``benchmarks/bench_large.py --method selfcal``).

    With ``compensate_k`` (``--compensate`` keeping that many neurons) the compensation passes run without the
    key/value cache, and hold as many layers' ``H`` as fit beside the blocks and the rest
    (:func:`compensation_layers`); the blocks are placed so that at least one layer's fits, where any placement
    lets it.

    Raises:
        ValueError: the budget cannot hold even one block with the rest (or, compensating, one layer's ``H``).
    """
    device = torch.device(device)
    resident, block_bytes, largest = _tensor_bytes(source, adapter, config)
    kv, activations = _probe_bytes(source, adapter, config, sequences, length, largest)
    if device.type == "cpu":
        resident += FORWARD_RUNTIME_BYTES
    fixed = resident + kv + activations
    blocks, estimate = _place_blocks(fixed, block_bytes, budget, device)
    if blocks is None:
        raise ValueError(
            f"--max-memory {format_bytes(budget)} cannot run this model one block at a time: it needs at least "
            f"{format_bytes(fixed + max(block_bytes))} (embeddings, head and runtime {format_bytes(resident)}, one "
            f"block {format_bytes(max(block_bytes))}, KV cache {format_bytes(kv)}, activations "
            f"{format_bytes(activations)}); raise --max-memory or lower --probe-sequences / --probe-length"
        )
    if compensate_k is not None:
        itemsize = source.state_dtype(adapter, config).itemsize
        # The compensation passes hold one layer's H and solve beside the blocks (no KV cache). Where that is more
        # than the selection pass holds, blocks kept all on the device could leave no room for it on a budget that
        # fits it with the blocks read one at a time: place them for the larger of the two.
        one_layer = layer_bytes(adapter, config, itemsize) + solve_bytes(adapter, config, compensate_k)
        least = resident + activations + one_layer
        if least > fixed:
            placed, _ = _place_blocks(least, block_bytes, budget, device)
            if placed is not None and placed != blocks:
                blocks = placed
                estimate = fixed + (sum(block_bytes) if blocks == "device" else max(block_bytes))
    plan = ForwardPlan(budget, str(device), blocks, resident, max(block_bytes), kv, activations, estimate)
    if compensate_k is not None:
        left = budget - (resident + activations + (sum(block_bytes) if blocks == "device" else max(block_bytes)))
        plan.compensation_layers = compensation_layers(adapter, config, compensate_k, itemsize, left)
        plan.compensation_bytes = layer_bytes(adapter, config, itemsize)
        plan.estimate = max(estimate, budget - left + plan.compensation_layers * plan.compensation_bytes
                            + solve_bytes(adapter, config, compensate_k))  # fmt: skip
    return plan


def compensation_layers(adapter: ModelAdapter, config, k: int, itemsize: int, available: int) -> int:
    """How many layers' compensation (:mod:`prunenet.compensation`) fit in ``available`` bytes: each holds every
    unit's ``H`` and out-projection copy (:func:`~prunenet.compensation.layer_bytes`), and one unit's solve
    runs beside them (at most every layer).

    Raises:
        ValueError: not even one layer fits.
    """
    per_layer, solve = layer_bytes(adapter, config, itemsize), solve_bytes(adapter, config, k)
    fits = (available - solve) // per_layer
    if fits < 1:
        raise ValueError(
            f"compensation needs {format_bytes(per_layer + solve)} for one layer (the n x n float32 H of each of its "
            f"FFN units, a copy of its out-projection, the solve) and {format_bytes(max(available, 0))} are left: "
            "raise --max-memory or pass --no-compensate"
        )
    return min(int(fits), adapter.num_layers(config))


def _tensor_bytes(source: CheckpointSource, adapter: ModelAdapter, config) -> tuple[int, list[int], int]:
    """``(resident, block_bytes, largest)``: the bytes of every tensor outside the blocks (embeddings, final
    norm, head), of each block's tensors, and of the largest tensor in a block."""
    prefixes = [adapter.checkpoint_prefix(i) for i in range(adapter.num_layers(config))]
    block_bytes, largest = [0] * len(prefixes), 0
    resident = 0
    for name, entry in source.entries.items():
        owner = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
        if owner is None:
            resident += entry.nbytes
        else:
            block_bytes[owner] += entry.nbytes
            largest = max(largest, entry.nbytes)
    return resident, block_bytes, largest


def _probe_bytes(source: CheckpointSource, adapter: ModelAdapter, config, sequences: int, length: int,
                 largest: int) -> tuple[int, int]:  # fmt: skip
    """``(kv, activations)``: the key/value cache of ``sequences`` probes at full ``length`` (capped at the
    model's context), and the largest activations of one block on them (see :func:`plan_forward`)."""
    layers = adapter.num_layers(config)
    itemsize = source.state_dtype(adapter, config).itemsize
    d, n = adapter.hidden_size(config), adapter.ffn_width(config)
    heads, kv_heads, head_dim = adapter.attention_shape(config)
    vocab = adapter.vocab_size(config)
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
    return kv, activations


def _place_blocks(fixed: int, block_bytes: list[int], budget: int, device: torch.device) -> tuple[str | None, int]:
    """``(blocks, estimate)``: every block on the device when all fit beside ``fixed`` bytes, else in host
    memory (CUDA, when they fit there) or read from disk, one resident at a time; ``blocks`` is ``None`` when
    not even one fits."""
    total = sum(block_bytes)
    if fixed + total <= budget:
        return "device", fixed + total
    if fixed + max(block_bytes) > budget:
        return None, fixed + max(block_bytes)
    host_free = free_memory("cpu") - RUNTIME_BYTES
    blocks = "host" if device.type == "cuda" and total <= host_free else "disk"
    return blocks, fixed + max(block_bytes)
