"""The latest results of every benchmark CSV in benchmarks/results, as aligned tables, with fast/PyTorch ratios.

    python benchmarks/summary.py                    # every CSV
    python benchmarks/summary.py slicing_cpu reward # only these (file names without .csv)
    python benchmarks/summary.py --markdown         # Markdown tables (e.g. for docs/)
    python benchmarks/summary.py --json             # one JSON object on the last line

CSVs are read generically, so a new benchmark needs no change here:

* measurement columns are recognised by name (``*_ms``, ``*_s``, ``*_mb``, ``*_bytes``, ``*_pct``,
  ``speedup*``, ``perplexity``, ...); run tags (``date``, ``timestamp``, ``git*``, ``torch*``, ``triton``,
  ``command``, ``loadavg*``) describe a run; every other column (shape, dtype, ratio, device, backend, ...) identifies a
  *case*;
* "latest" is the last row of each case in file order (CSVs are appended to), so one table mixes cases
  measured by different runs only where a later run did not measure them again: the date and git
  columns say which;
* rows that differ only in ``seed`` are summarised as the median over seeds (``n`` says how many);
* where a variant column (``backend``, ``path``, ``method``) holds both a fast path and its reference
  (``native``/``triton``/``fast`` vs ``torch``; ``torch`` vs ``original``), the ratio of their times is
  shown per case: reference time / fast time, so above 1 means the fast path is faster.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from pathlib import Path

from prunenet.tables import format_table, markdown_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

TAGS = re.compile(r"^(date|timestamp|git.*|torch.*|triton.*|command|created|loadavg.*)$")
MEASURES = re.compile(
    r"(_ms|_s|_mb|_bytes|_pct|_per_s)$|^(speedup.*|perplexity|nll|tokens|max_rel_diff|ok|peak_method|repeats|runs|minutes|seconds)$"
)
TIMES = re.compile(r"(_ms|_s)$")
VARIANT_COLUMNS = ("backend", "path", "method")
# (fast, reference) pairs: the ratio shown is reference time / fast time.
PAIRS = [("native", "torch"), ("triton", "torch"), ("fast", "torch"), ("torch", "original")]
HIDDEN = {"command", "peak_method", "memory_method", "model_label"}  # long texts that widen tables


def _number(value: str) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _tag(row: dict, names: tuple[str, ...]) -> str:
    return next((row[n] for n in names if row.get(n)), "")


def latest(rows: list[dict], columns: list[str]) -> tuple[list[str], list[dict]]:
    """Case columns and the latest row of each case (medians over ``seed`` where there is one)."""
    case = [c for c in columns if not TAGS.match(c) and not MEASURES.search(c) and c != "seed"]
    last: dict[tuple, list[dict]] = {}
    for row in rows:
        key = tuple(row.get(c, "") for c in case)
        run = (_tag(row, ("date", "timestamp")), _tag(row, ("git", "git_revision")))
        kept = last.get(key, [])
        # A new run of the case replaces the old rows; rows of the same run (other seeds) accumulate.
        same_run = kept and (_tag(kept[-1], ("date", "timestamp")), _tag(kept[-1], ("git", "git_revision"))) == run
        last[key] = [*kept, row] if same_run else [row]
    out = []
    for group in last.values():
        merged = dict(group[-1])
        if "seed" in columns:
            for c in columns:
                values = [_number(r.get(c, "")) for r in group]
                if MEASURES.search(c) and all(v is not None for v in values) and values:
                    merged[c] = f"{statistics.median(values):.4g}"
            merged["seed"] = f"n={len(group)}" if len(group) > 1 else group[0].get("seed", "")
        out.append(merged)
    return case, out


def ratios(case: list[str], rows: list[dict]) -> list[dict]:
    """Per case and time column: reference time / fast time for every (fast, reference) variant pair present."""
    variant = next((c for c in VARIANT_COLUMNS if c in case), None)
    if variant is None:
        return []
    others = [c for c in case if c != variant]
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(tuple(row[c] for c in others), {})[row[variant]] = row
    out = []
    for key, variants in by_case.items():
        for fast, ref in PAIRS:
            if fast in variants and ref in variants:
                entry = {**dict(zip(others, key, strict=True)), "pair": f"{ref}/{fast}"}
                for col in variants[fast]:
                    a, b = _number(variants[fast][col]), _number(variants[ref].get(col, ""))
                    if TIMES.search(col) and a and b is not None:
                        entry[col] = f"{b / a:.2f}x"
                if len(entry) > len(others) + 1:
                    out.append(entry)
    return out


def render(headers: list[str], rows: list[dict], markdown: bool, max_rows: int) -> str:
    shown = rows[:max_rows]
    body = [[r.get(h, "") for h in headers] for r in shown]
    text = markdown_table(headers, body) if markdown else format_table(headers, body)
    if len(rows) > max_rows:
        text += f"\n... {len(rows) - max_rows} more rows (--max-rows)"
    return text


def summarize(path: Path, markdown: bool = False, max_rows: int = 60) -> tuple[str, dict]:
    """The text block for one CSV and its JSON form."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = list(reader.fieldnames or []), list(reader)
    if not rows:
        return f"{path.name}: no rows", {"rows": [], "ratios": []}
    case, rows = latest(rows, columns)
    shown = [c for c in columns if c not in HIDDEN]
    pairs = ratios(case, rows)
    title = f"## {path.name}" if markdown else f"== {path.name} ({len(rows)} latest rows) =="
    blocks = [title, "", render(shown, rows, markdown, max_rows)]
    if pairs:
        cols = list(dict.fromkeys(k for p in pairs for k in p))
        blocks += ["", "Ratios (reference time / fast-path time; > 1: the fast path is faster):", ""]
        blocks.append(render(cols, pairs, markdown, max_rows))
    return "\n".join(blocks), {"rows": rows, "ratios": pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="CSV names (without .csv) to show; default: all")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the CSVs")
    parser.add_argument("--markdown", action="store_true", help="Markdown tables instead of aligned text")
    parser.add_argument("--max-rows", type=int, default=60, help="rows shown per table")
    parser.add_argument("--json", action="store_true", help="also print everything as one JSON object, last line")
    args = parser.parse_args(argv)
    files = sorted(args.results.glob("*.csv"))
    if args.names:
        files = [f for f in files if f.stem in args.names]
        missing = set(args.names) - {f.stem for f in files}
        if missing:
            print(f"summary: no such CSV in {args.results}: {', '.join(sorted(missing))}", file=sys.stderr)
            return 2
    if not files:
        print(f"summary: no CSV files in {args.results}", file=sys.stderr)
        return 2
    everything = {}
    for path in files:
        text, data = summarize(path, args.markdown, args.max_rows)
        everything[path.stem] = data
        print(text + "\n")
    if args.json:
        print(json.dumps(everything))
    return 0


if __name__ == "__main__":
    sys.exit(main())
