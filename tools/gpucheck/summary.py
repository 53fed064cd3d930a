"""The files under --out: summary.md and summary.csv (a row per step), and the measurement CSVs' reading and writing."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from .check import ROOT, Check, StepResult
from .environment import environment_lines


def write_rows(path: Path, rows: list[dict]) -> None:
    """Replace ``path`` with ``rows`` (header: the first row's keys)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summary_table(results: list[StepResult]) -> str:
    """One Markdown row per step, by the package's own table formatter (the checkout's: the check needs no
    installed prunenet, and prunenet.tables imports nothing but the standard library)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the parent imports no torch or transformers: nothing here is shadowed
    from prunenet.tables import markdown_table

    rows = [(r.step, r.status, f"{r.seconds:.1f}", r.details.replace("\n", " ")) for r in results]
    return markdown_table(["step", "status", "seconds", "key numbers / reason"], rows)


def write_summary(check: Check, started: str, final: bool = False) -> str:
    """summary.md and summary.csv from the results so far: the steps not yet run are ``pending`` (``not
    run`` in the final summary of an interrupted run)."""
    done = {r.step for r in check.results}
    rest = "not run" if final else "pending"
    rows = check.results + [StepResult(s, rest) for s in check.args.only if s not in done]
    table = summary_table(rows)
    mode = "dry run on CPU" if check.dry else "GPU run"
    head = [f"# tools/gpu-check: {mode}, started {started}", ""] + [f"- {line}" for line in environment_lines(check)]
    (check.out / "summary.md").write_text("\n".join(head) + "\n\n" + table + "\n")
    with open(check.out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "status", "seconds", "details"])
        writer.writerows([r.step, r.status, f"{r.seconds:.1f}", r.details] for r in rows)
    return table
