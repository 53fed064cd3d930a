"""Distributed compress (torch.distributed, gloo on CPU, world size 2, spawned here): the same result as a
single process, and a failing rank ends the whole job with no partial output."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from running import run_cli
from safetensors.torch import load_file
from tiny_models import all_tensors, save_sharded

from prunenet.checkpoint import POLICY_FILE, read_manifest
from prunenet.distributed import Distributed
from prunenet.pipeline import compress

KW = dict(ratio=0.25, method="prunenet", episodes=3, seed=5, progress=False, streaming=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, source: str, out: str, fail: str) -> None:
    """One rank: join the gloo group as torchrun would, optionally break, and compress."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    import prunenet.shard_writer
    import prunenet.train
    from prunenet import distributed

    def broken(*args, **kwargs):
        raise RuntimeError(f"rank {rank} breaks on purpose")

    if rank == 1 and fail == "train":
        prunenet.train.episode_rewards = broken
    if rank == 1 and fail == "write":
        prunenet.shard_writer.write_shard = broken
    dist, device = distributed.init("cpu", timeout_s=120)
    try:
        compress(model=source, out=out, device=device, dist=dist, **KW)
    finally:
        distributed.shutdown(dist)


def run_ranks(world: int, source, out, fail: str = "", timeout: float = 240) -> list[int]:
    """Start ``world`` ranks and wait for each to end on its own; returns their exit codes."""
    ctx = mp.start_processes(
        worker,
        args=(world, free_port(), str(source), str(out), fail),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    for p in ctx.processes:
        p.join(max(1.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in ctx.processes]
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    return codes


def test_layer_and_shard_ownership_cover_everything_once():
    for layers in (1, 2, 5, 32, 80):
        for world in (1, 2, 3, 8):
            owned = [Distributed(r, world).owned_layers(layers) for r in range(world)]
            assert [i for block in owned for i in block] == list(range(layers))
            assert max(map(len, owned)) - min(map(len, owned)) <= 1
            for r, block in enumerate(owned):
                assert all(Distributed(0, world).owner(i, layers) == r for i in block)
    shards = [f"s{i}" for i in range(5)]
    assert sorted(s for r in range(2) for s in Distributed(r, 2).owned_shards(shards)) == shards


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "src"
    save_sharded("llama", folder)  # 2 layers, several shards
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mixtral"])  # mixtral: the ranks split the experts' units
def test_two_ranks_give_the_single_process_result(family, tmp_path):
    source = tmp_path / "src"
    save_sharded(family, source)
    compress(model=str(source), out=tmp_path / "one", **KW)
    assert run_ranks(2, source, tmp_path / "two") == [0, 0]
    one, two = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert two["kept_indices"] == one["kept_indices"]
    assert two["training"]["episode_rewards"] == one["training"]["episode_rewards"]
    p1, p2 = load_file(tmp_path / "one" / POLICY_FILE), load_file(tmp_path / "two" / POLICY_FILE)
    assert p1.keys() == p2.keys() and all(torch.equal(p1[n], p2[n]) for n in p1)  # the same final policy
    a, b = all_tensors(tmp_path / "one"), all_tensors(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "src", "two"]  # no partial folders


@pytest.mark.slow
@pytest.mark.parametrize("fail", ["train", "write"])
def test_a_failing_rank_fails_the_job_cleanly(source, tmp_path, fail):
    codes = run_ranks(2, source, tmp_path / "out", fail)
    assert None not in codes, "a rank hung"
    assert all(code != 0 for code in codes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no partial folder


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prunenet", "selfcal"])
def test_torchrun_command_line(source, tmp_path, method):
    """The documented command: `torchrun --nproc-per-node 2 -m prunenet compress ...`; with selfcal, rank 0
    runs the model (offloaded block by block) and the other rank writes its shards with the same choice."""
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    args = ["compress", "--model", str(source), "--out", str(tmp_path / "out"), "--ratio", "0.25"]
    args += ["--seed", "5", "--device", "cpu", "--quiet", "--method", method]
    args += ["--episodes", "3"] if method == "prunenet" else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_cli(*args, launcher=torchrun, check=False, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("FFN width") == 1  # one rank reports
    options = {**KW, "method": method}
    if method != "prunenet":
        del options["episodes"]  # the policy's option: refused with another method
    compress(model=str(source), out=tmp_path / "one", **options)
    assert read_manifest(tmp_path / "out")["kept_indices"] == read_manifest(tmp_path / "one")["kept_indices"]
    a, b = all_tensors(tmp_path / "one"), all_tensors(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
