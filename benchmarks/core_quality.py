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
    rows = [
        {
            "ratio": 0.0,
            "method": "dense",
            "seed": "",
            "perplexity": evaluate("smollm2-135m", args.max_tokens, args.context),
        }
    ]
    print(rows[-1], flush=True)
    for ratio in args.ratios:
        out = work / f"prunenet-{ratio}"
        common = ["--ratio", str(ratio), "--overwrite"]
        run_json(["compress", *common, "--out", str(out), "--episodes", str(args.episodes), "--seed", "0"])
        rows.append(
            {
                "ratio": ratio,
                "method": "prunenet-sample",
                "seed": 0,
                "perplexity": evaluate(str(out), args.max_tokens, args.context),
            }
        )
        print(rows[-1], flush=True)
        topk = work / f"prunenet-topk-{ratio}"
        run_json(["compress", *common, "--out", str(topk), "--policy", str(out), "--selection", "topk"])
        rows.append(
            {
                "ratio": ratio,
                "method": "prunenet-topk",
                "seed": 0,
                "perplexity": evaluate(str(topk), args.max_tokens, args.context),
            }
        )
        print(rows[-1], flush=True)
        for method, seeds in (("magnitude", [0]), ("random", range(args.seeds))):
            for seed in seeds:
                folder = work / f"{method}-{ratio}-{seed}"
                run_json(["compress", *common, "--out", str(folder), "--method", method, "--seed", str(seed)])
                rows.append(
                    {
                        "ratio": ratio,
                        "method": method,
                        "seed": seed,
                        "perplexity": evaluate(str(folder), args.max_tokens, args.context),
                    }
                )
                print(rows[-1], flush=True)

    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")  # noqa: UP017
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
