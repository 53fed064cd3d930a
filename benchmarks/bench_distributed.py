"""Scaling of policy training with the number of ranks (torch.distributed: gloo on CPU, NCCL on GPUs).

    python benchmarks/bench_distributed.py --checkpoint /tmp/prunenet-bench-large/llama2-7b-fp16
    python benchmarks/bench_distributed.py --checkpoint CKPT --ranks 1 2 4 8 --device cuda --layers 32

For each rank count N the script launches ``torchrun --nproc-per-node N`` on itself (``--worker``):
every rank streams its share of the first ``--layers`` layers' state matrices from the checkpoint
and :func:`prunenet.train.train_policy` runs with the ranks sharing rewards and gradients, exactly
as ``torchrun ... -m prunenet compress`` does. Rank 0 reports the set-up time (reference spectra and
``W^T W``), the time of each episode and the peak RSS. With N ranks on C CPU cores each rank gets C/N
threads (``OMP_NUM_THREADS``; ``--threads-per-rank`` overrides), so every run uses the whole
machine. The runs must agree on the rewards (the result does not depend on N). Creates the
checkpoint with make_checkpoint.py when missing.
Results: ``benchmarks/results/distributed_<cpu|cuda>.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import OtherLoad, append_csv, device_label, run_tags  # noqa: E402


def worker(args) -> None:
    """One rank: train on its layers; rank 0 prints a RESULT line."""
    from bench_large import peak_rss_bytes
    from transformers import AutoConfig

    from prunenet import distributed
    from prunenet.adapters import get_adapter
    from prunenet.config import kept_width
    from prunenet.streaming import CheckpointSource, CheckpointStates
    from prunenet.train import TrainConfig, train_policy

    dist, device = distributed.init(args.device)
    config = AutoConfig.from_pretrained(args.checkpoint)
    config.num_hidden_layers = args.layers  # the first --layers blocks
    adapter = get_adapter(config)
    owned = dist.owned_layers(args.layers)
    states = CheckpointStates(CheckpointSource(args.checkpoint), adapter, config, device, "disk", layers=owned)
    k = kept_width(args.ratio, adapter.ffn_width(config))
    result = train_policy(states, k, TrainConfig(episodes=args.episodes, seed=0), progress=False, dist=dist)
    states.close()
    peak = torch.tensor([peak_rss_bytes()], dtype=torch.int64)
    dist.all_reduce_sum(peak)  # total over the ranks
    if dist.is_main:
        row = {
            "prepare_s": result.prepare_seconds,
            "episode_s": result.episode_seconds,
            "rewards": result.episode_rewards,
            "peak_rss_total_bytes": int(peak),
            "threads_per_rank": torch.get_num_threads(),
        }
        print("RESULT " + json.dumps(row), flush=True)
    distributed.shutdown(dist)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="/tmp/prunenet-bench-large/llama2-7b-fp16")
    parser.add_argument("--shape", default="llama2-7b", help="make_checkpoint.py shape, if the checkpoint is missing")
    parser.add_argument("--layers", type=int, default=4, help="train on the first N layers")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads-per-rank",
        type=int,
        default=None,
        help="CPU threads of each rank (default: cores / ranks, so every run uses the whole machine; 1 isolates "
        "the gain from more ranks from that of more threads per rank)",
    )
    parser.add_argument("--csv", default=None, help="default: benchmarks/results/distributed_<cpu|cuda>.csv")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if not Path(args.checkpoint).exists():
        from make_checkpoint import make_checkpoint

        Path(args.checkpoint).parent.mkdir(parents=True, exist_ok=True)
        make_checkpoint(args.shape, Path(args.checkpoint), "fp16")
    cores = os.cpu_count() or 1
    rows, reference = [], None
    for n in args.ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", "29571"]
        cmd += [__file__, "--worker", "--checkpoint", args.checkpoint, "--layers", str(args.layers)]
        cmd += ["--episodes", str(args.episodes), "--ratio", str(args.ratio), "--device", args.device]
        threads = args.threads_per_rank or (max(1, cores // n) if args.device == "cpu" else 1)
        start = time.perf_counter()
        with OtherLoad() as load:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{n} ranks failed (exit {proc.returncode})")
        r = json.loads(lines[-1][len("RESULT ") :])
        reference = reference or r["rewards"]
        episode = sum(r["episode_s"]) / len(r["episode_s"])
        print(
            f"{n} rank(s): set-up {r['prepare_s']:.1f} s, episode {episode:.1f} s, rewards {r['rewards']}", flush=True
        )
        rows.append(
            {
                **run_tags(args.device),
                "device": device_label(args.device),
                "checkpoint": Path(args.checkpoint).name,
                "layers": args.layers,
                "ratio": args.ratio,
                "ranks": n,
                "threads_per_rank": r["threads_per_rank"],
                "setup_s": round(r["prepare_s"], 2),
                "episode_s": round(episode, 2),
                "episode_speedup": round(rows[0]["episode_s"] / episode, 2) if rows else 1.0,
                "wall_s": round(wall, 1),
                "peak_rss_total_gib": round(r["peak_rss_total_bytes"] / 2**30, 3),
                "same_rewards_as_first": r["rewards"] == reference,
                "other_cpu_load": load.value,
            }
        )
    csv_path = Path(args.csv) if args.csv else HERE / "results" / f"distributed_{torch.device(args.device).type}.csv"
    append_csv(csv_path, rows)
    print(f"appended {len(rows)} rows to {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
