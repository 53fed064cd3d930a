"""Perplexity of PruneNet vs random and magnitude selection on the embedded model, via the CLI.

Runs exactly the commands a user would (`prunenet compress`, `prunenet eval --json`) and writes
`benchmarks/results/core_quality.csv` plus a Markdown table (`core_quality.md`) for the README.

    python benchmarks/core_quality.py [--ratios 0.1 0.2 0.3] [--seeds 5] [--work DIR]

PruneNet's policy is trained once per ratio (20 episodes, seed 0) and applied with both
selections (`--selection sample`, the paper's rule, and `--selection topk` via `--policy`).
Random rows are drawn with seeds 0..N-1: report the median and the range, never one draw.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_json(args: list[str]) -> dict:
    """Run `python -m prunenet ARGS --json --quiet` and parse the JSON on its last stdout line."""
    cmd = [sys.executable, "-m", "prunenet", *args, "--json", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def evaluate(model: str, max_tokens: int, context: int) -> float:
    return run_json(["eval", "--model", model, "--max-tokens", str(max_tokens), "--context", str(context)])[
        "perplexity"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--seeds", type=int, default=5, help="random-selection seeds")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--work", default=None, help="scratch folder for pruned models (default: a temp dir)")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="prunenet-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = [{"ratio": 0.0, "method": "dense", "seed": "", "perplexity": evaluate("smollm2-135m", args)}]
    print(rows[-1], flush=True)

    def measure(ratio: float, name: str, seed: int, folder: Path, *compress_args: str, keep_folder=False) -> None:
        run_json(["compress", "--ratio", str(ratio), "--seed", str(seed), "--out", str(folder), "--overwrite",
                  *compress_args])  # fmt: skip
        rows.append({"ratio": ratio, "method": name, "seed": seed, "perplexity": evaluate(str(folder), args)})
        print(rows[-1], flush=True)
        if not keep_folder:
            shutil.rmtree(folder)  # ~0.5 GB each

    for ratio in args.ratios:
        trained = work / f"prunenet-{ratio}"
        measure(ratio, "prunenet-sample", 0, trained, "--episodes", str(args.episodes), keep_folder=True)
        measure(ratio, "prunenet-topk", 0, work / "topk", "--policy", str(trained), "--selection", "topk")
        measure(ratio, "magnitude", 0, work / "magnitude", "--method", "magnitude")
        for seed in range(args.seeds):
            measure(ratio, "random", seed, work / "random", "--method", "random")

    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(RESULTS / "core_quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=["date", "max_tokens", "context", "ratio", "method", "seed", "perplexity"]
        )
        writer.writeheader()
        for row in rows:
            writer.writerow({"date": stamp, "max_tokens": args.max_tokens, "context": args.context, **row})
    (RESULTS / "core_quality.md").write_text(markdown_table(rows, args))
    print((RESULTS / "core_quality.md").read_text())


def markdown_table(rows: list[dict], args) -> str:
    dense = next(r["perplexity"] for r in rows if r["method"] == "dense")
    lines = [
        f"Perplexity (lower is better) of SmolLM2-135M on the held-out text (State of the Union addresses "
        f"1990-2026), first {args.max_tokens} tokens in {args.context}-token windows; dense: {dense:.1f}.",
        "",
        "| ratio | PruneNet, sampling (paper) | PruneNet, top-k | random rows: median (min-max), "
        f"{args.seeds} seeds | magnitude (L2 of rows) |",
        "|---|---|---|---|---|",
    ]
    for ratio in args.ratios:
        pick = {
            m: [r["perplexity"] for r in rows if r["ratio"] == ratio and r["method"] == m]
            for m in ("prunenet-sample", "prunenet-topk", "random", "magnitude")
        }
        rnd = pick["random"]
        lines.append(
            f"| {ratio} | {pick['prunenet-sample'][0]:.1f} | {pick['prunenet-topk'][0]:.1f} | "
            f"{statistics.median(rnd):.1f} ({min(rnd):.1f}-{max(rnd):.1f}) | {pick['magnitude'][0]:.0f} |"
        )
    lines.append("")
    lines.append("Reproduce: `python benchmarks/core_quality.py` (CSV: `benchmarks/results/core_quality.csv`).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
