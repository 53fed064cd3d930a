"""End-to-end `prunenet compress` timing: wall-clock, phase times and peak RSS, fast path vs pure-PyTorch path.

    python benchmarks/bench_compress.py --quick      # 3 episodes, 1 run per path (about 1-2 min on 2 CPU cores)
    python benchmarks/bench_compress.py              # 20 episodes (the default of compress), median of 3 runs

Each run is the command a user types, in its own process:

    prunenet compress --model smollm2-135m --ratio 0.3 --method prunenet --episodes E --out <tmp> --overwrite \
        --json --quiet

* ``fast``: as installed (native extension for slicing; ``--reward-backend auto``: Triton on CUDA);
* ``torch``: ``PRUNENET_DISABLE_EXT=1`` and ``--reward-backend torch``, the pure-PyTorch path everywhere.

Wall-clock is measured around the child process (interpreter start and imports included: what the user
waits for); the phase times (load, training, slicing, saving) come from the command's own ``--json``
summary. Peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (kernel-tracked; exact for that process
alone). The embedded model is converted to its cache once before timing (a first use would otherwise
add ~25 s to the first run). Reported values are medians over ``--repeats`` (peak RSS: the maximum).
One CSV row per path is appended to ``benchmarks/results/compress.csv``, tagged with date, git revision,
torch version and device.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prunenet.tables import format_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_csv, run_tags  # noqa: E402

PATHS = {
    "fast": ({}, []),
    "torch": ({"PRUNENET_DISABLE_EXT": "1"}, ["--reward-backend", "torch"]),
}


def _has_reward_backend_flag() -> bool:
    """Whether this prunenet's `compress` has `--reward-backend` (added alongside the Triton reward kernels)."""
    from prunenet.cli import build_parser

    try:
        build_parser().parse_args(["compress", "--ratio", "0.1", "--out", "x", "--reward-backend", "torch"])
    except SystemExit:
        return False
    return True


def run_compress(args: list[str], env: dict[str, str]) -> dict:
    """Run `python -m prunenet compress ARGS --json --quiet` once; its summary plus ``wall_s`` and ``peak_rss_mb``."""
    cmd = [sys.executable, "-m", "prunenet", "compress", *args, "--json", "--quiet"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        tick = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **env})
        # wait4 gives this child's own resource usage (RUSAGE_CHILDREN would mix in every earlier child).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - tick
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {**summary, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}  # ru_maxrss is in kB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 episodes, 1 run per path")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--episodes", type=int, default=None, help="default: 3 with --quick, else 20")
    parser.add_argument("--repeats", type=int, default=None, help="runs per path; default: 1 with --quick, else 3")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "compress.csv", help="CSV to append to")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list on the last line")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    episodes = args.episodes or (3 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 3)

    if args.model.lower() == "smollm2-135m":
        from prunenet.embedded import ensure_default_model

        ensure_default_model()  # convert once, untimed
    backend_flag = _has_reward_backend_flag()
    tags = run_tags(args.device)
    command = shlex.join(["python", "benchmarks/bench_compress.py", *(argv if argv is not None else sys.argv[1:])])
    rows = []
    with tempfile.TemporaryDirectory(prefix="prunenet-bench-") as tmp:
        runs = [(path, i) for i in range(repeats) for path in args.paths]  # interleaved: shared-machine load hits both
        results: dict[str, list[dict]] = {path: [] for path in args.paths}
        for path, _ in tqdm(runs, desc="compress runs", unit="run", disable=args.quiet):
            env, extra = PATHS[path]
            cli = ["--model", args.model, "--ratio", str(args.ratio), "--method", "prunenet",
                   "--episodes", str(episodes), "--device", args.device, "--out", str(Path(tmp) / path),
                   "--overwrite"]  # fmt: skip
            results[path].append(run_compress(cli + (extra if backend_flag else []), env))
    for path, res in results.items():

        def med(key: str, res=res) -> float:
            values = [r[key] for r in res if key in r]
            return round(statistics.median(values), 3) if values else float("nan")

        rows.append(
            {
                **tags,
                "path": path,
                "model": args.model,
                "ratio": args.ratio,
                "episodes": episodes,
                "repeats": repeats,
                "wall_s": med("wall_s"),
                "load_s": med("load_s"),
                "train_s": med("train_s"),
                "slice_s": med("slice_s"),
                "save_s": med("save_s"),
                "peak_rss_mb": round(max(r["peak_rss_mb"] for r in res), 1),
                "params_before": res[0]["params_before"],
                "params_after": res[0]["params_after"],
                "command": command,
            }
        )
    append_csv(args.out, rows)

    cols = ["path", "wall_s", "load_s", "train_s", "slice_s", "save_s", "peak_rss_mb"]
    print(format_table(cols, [[r[c] for c in cols] for r in rows], right=range(1, len(cols))))
    if {"fast", "torch"} <= set(results):
        fast, ref = (next(r for r in rows if r["path"] == p) for p in ("fast", "torch"))
        ratios = [(key, ref[key] / fast[key]) for key in ("wall_s", "train_s", "slice_s") if fast[key] > 0]
        print("torch path / fast path: " + ", ".join(f"{key} {value:.2f}x" for key, value in ratios))
    print(f"{len(rows)} rows appended to {args.out} ({tags['device']}, torch {tags['torch']}, git {tags['git']})")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
