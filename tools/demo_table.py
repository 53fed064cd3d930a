"""The table ``make demo`` ends with: the dense model and its pruned versions, measured the same way.

Usage: python tools/demo_table.py DENSE PRUNED [PRUNED ...] [--max-tokens N]

Each model's perplexity on the embedded held-out text (``prunenet eval``'s default) and its parameter
count; for a folder written by ``prunenet compress``, the method and FFN width from its manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

LABELS = {"prunenet": "prunenet (paper's policy)"}  # how the table names a method whose bare name does not say


def describe(spec: str) -> tuple[str, str]:
    """``(method, FFN width)`` from a compress output's manifest; the dense model's for anything else."""
    manifest = Path(spec) / "prunenet.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        return LABELS.get(m["method"], m["method"]), f"{m['ffn_width_before']} -> {m['k']}"
    return "dense", "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="the dense model first, then the pruned folders")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens of held-out text per model")
    args = parser.parse_args(argv)
    progress = sys.stderr.isatty()
    if not progress:  # no progress bars in a log (huggingface_hub and transformers read this when they load)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    from prunenet.config import EvalConfig
    from prunenet.evaluate import evaluate_models
    from prunenet.tables import format_table

    config = EvalConfig(max_tokens=args.max_tokens)
    rows, dense = [], None
    for spec in args.models:
        result = evaluate_models(spec, config, progress=progress)
        dense = dense or result
        method, width = describe(spec)
        rows.append((method, width, f"{result['parameters']:,}", f"{result['perplexity']:.2f}",
                     f"{result['perplexity'] / dense['perplexity']:.2f}x"))  # fmt: skip
    headers = ["method", "FFN width", "parameters", f"perplexity ({dense['tokens']} tokens)", "vs dense"]
    print(format_table(headers, rows, right=[2, 3, 4]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
