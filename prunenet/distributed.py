"""Running ``compress`` on several processes with ``torch.distributed`` (launched by ``torchrun``).

Layers are split into contiguous blocks, one per rank. Each rank reads only its layers' state
matrices (from the checkpoint, streaming) and computes their rewards; the ranks then combine what
the others need, so that every rank holds the same policy after every update and the result is
the single-process result, bit for bit:

* **Sampling.** Row selection draws from one seeded generator, layer after layer. A rank draws the
  random numbers of every layer, using only those of its own layers
  (:func:`prunenet.policy.skip_selection` consumes exactly what :func:`~prunenet.policy.select_rows`
  would), so each layer sees the same numbers as in a single process.
* **Rewards.** Each rank fills its layers' entries of an ``(L,)`` float64 vector, the others hold
  zeros, and one all-reduce (sum) gives every rank the full vector. Adding zeros is exact.
* **Policy updates.** Training takes one AdamW step per layer, in layer order (the reference code
  does so), each step depending on the previous one. The owner of layer ``i`` computes its
  gradient and broadcasts it (the all-reduce of a gradient only one rank contributes to, at half
  the traffic); every rank then clips and steps identically.

The expensive part of an episode, the rewards (a Gram matrix and an eigen-solve per layer), runs
in parallel; the per-layer gradient (one matrix-vector product) is cheap.

Failures: before every phase boundary the ranks agree on success (:meth:`Distributed.agree`), so a
rank that raises makes the others raise too, and rank 0 removes the partial output. A rank that
dies outright breaks the process group's connections, which makes the others' collectives fail.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """Another rank failed; this one stops too."""


@dataclass
class Distributed:
    """This process's place in a ``torch.distributed`` job (``world_size == 1``: a single process).

    Attributes:
        rank, world_size: as set by ``torchrun`` (``RANK``, ``WORLD_SIZE``).
        local_rank: the process's index on its machine (``LOCAL_RANK``): its GPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owned_layers(self, num_layers: int) -> range:
        """This rank's layers: a contiguous block; blocks differ in size by at most one."""
        per, extra = divmod(num_layers, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (self.rank < extra))

    def owner(self, layer: int, num_layers: int) -> int:
        """The rank that owns ``layer``."""
        per, extra = divmod(num_layers, self.world_size)
        big = extra * (per + 1)  # the first `extra` ranks own per + 1 layers
        return layer // (per + 1) if layer < big else extra + (layer - big) // per

    def owned_shards(self, shards: Sequence[str]) -> list[str]:
        """The output shards this rank writes: every ``world_size``-th."""
        return list(shards[self.rank :: self.world_size])

    # -- collectives (no-ops in a single process) -------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            with _on_backend_device(tensor) as moved:
                torch.distributed.all_reduce(moved)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if self.active:
            with _on_backend_device(tensor) as moved:
                torch.distributed.broadcast(moved, src)
        return tensor

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def agree(self, ok: bool, what: str) -> None:
        """Every rank reports whether its part of ``what`` succeeded; if any failed, all raise.

        The failing rank calls this with ``ok=False`` before re-raising its own error; the others get
        :class:`DistributedError` naming the failed ranks.
        """
        if not self.active:
            return
        flags = torch.zeros(self.world_size, dtype=torch.int32)
        flags[self.rank] = int(not ok)
        torch.distributed.all_reduce(flags)
        failed = flags.nonzero().flatten().tolist()
        if failed and ok:
            raise DistributedError(f"rank(s) {failed} failed while {what}; stopping (their logs say why)")


def from_environment() -> Distributed:
    """The job described by ``torchrun``'s environment variables (a single process without them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    return Distributed(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def _on_backend_device(tensor: torch.Tensor):
    """``tensor``, or for NCCL (which takes CUDA tensors only) a copy on this rank's GPU that is copied back into
    ``tensor`` when the collective is done: the selectors' choices and refitted columns live on the CPU."""
    if torch.distributed.get_backend() != "nccl" or tensor.is_cuda:
        yield tensor
        return
    moved = tensor.to(f"cuda:{torch.cuda.current_device()}")
    yield moved
    tensor.copy_(moved.cpu())


def init(device: str, timeout_s: float = 1800.0) -> tuple[Distributed, str]:
    """Join the process group when launched by ``torchrun``; returns ``(dist, device)``.

    NCCL on CUDA devices (each rank on GPU ``LOCAL_RANK``), gloo on CPU. In a single process this
    does nothing. (SIGTERM, which ``torchrun`` sends to the survivors when a rank fails, unwinds
    each rank through its cleanups: see :func:`prunenet.cli.main`.)
    """
    dist = from_environment()
    if not dist.active:
        return dist, device
    if torch.device(device).type == "cuda":
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if torch.distributed.get_world_size() != dist.world_size:
        raise RuntimeError("WORLD_SIZE does not match the process group's size")
    log.info("rank %d of %d (%s, %s)", dist.rank, dist.world_size, backend, device)
    return dist, device


def shutdown(dist: Distributed) -> None:
    """Leave the process group (after the last collective)."""
    if dist.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
