"""Helpers shared by the report and benchmark scripts: run tags for CSV rows, generated doc blocks, CSV I/O."""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from provenance import cpu_model_name, git_revision  # noqa: F401  (git_revision: the benchmarks import it from here)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
"""The documentation pages; each generated block lives in exactly one of them (``tests/test_docs.py``)."""


def device_label(device: str | torch.device = "cpu") -> str:
    """``"NVIDIA H100 80GB HBM3"`` for CUDA; ``"cpu: AMD EPYC (2 threads)"`` for CPU (the thread count matters)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = cpu_model_name() or platform.processor() or platform.machine()
    return f"cpu: {name} ({torch.get_num_threads()} threads)"


def run_tags(device: str | torch.device = "cpu") -> dict[str, str]:
    """Columns that identify a run in every CSV row: UTC time, git revision, torch version, device."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_revision(),
        "torch": torch.__version__,
        "device": device_label(device),
    }


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to ``path``, writing the header if the file is new; a file with other columns is an error."""
    if not rows:
        return
    fields = list(rows[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise ValueError(f"{path} has columns {header}, these rows {fields}: move the old file aside")
        mode = "a"
    else:
        mode = "w"
    with open(path, mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if mode == "w":
            writer.writeheader()
        writer.writerows(rows)


def finished_keys(path: Path, key: tuple[str, ...]) -> set[tuple[str, ...]]:
    """The ``key`` columns (as written: strings) of every row of ``path`` so far: what a resumed study skips."""
    if not path.exists():
        return set()
    with open(path, newline="") as f:
        return {tuple(row[k] for k in key) for row in csv.DictReader(f)}


def write_csv(path: Path, rows: list[dict]) -> None:
    """Replace ``path`` with ``rows`` (header from the first row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def replace_block(text: str, name: str, content: str) -> str:
    """``text`` with what lies between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` replaced by ``content``.

    Raises:
        ValueError: the markers are missing, or not exactly once each in that order.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if text.count(begin) != 1 or text.count(end) != 1 or not pattern.search(text):
        raise ValueError(f"expected one '{begin}' followed by one '{end}' line; add them where the block goes")
    return pattern.sub(lambda _: f"{begin}\n{content.strip()}\n{end}", text)


def update_doc_block(name: str, content: str, page: Path) -> None:
    """Regenerate the ``name`` block of the Markdown file ``page`` (see :func:`replace_block`), e.g. the
    ``quality`` block of ``docs/results.md``; the rest of the page is left untouched."""
    page.write_text(replace_block(page.read_text(encoding="utf-8"), name, content), encoding="utf-8")


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, by this process and its finished children), from ``/proc/stat``."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return math.nan, math.nan
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """How many CPUs *other* processes kept busy while a measurement ran (their load makes CPU timings
    unreliable). ``with OtherLoad() as load: ...`` then ``load.value``; children of this process count
    as ours once they have been waited for."""

    def __enter__(self):
        (self._busy, self._own), self._tick = cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        (busy, own), wall = cpu_seconds(), time.perf_counter() - self._tick
        self.value = round(max(0.0, (busy - self._busy) - (own - self._own)) / wall, 2)
        return False


def cell(values: list[float]) -> str:
    """``median (min-max)`` for several runs, the value alone for one, ``-`` for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def pyplot(script: str):
    """``matplotlib.pyplot`` on the file-only Agg backend, or ``None`` (with a note naming ``script``) when
    matplotlib is not installed: the reports then skip their plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{script}: matplotlib is not installed (pip install 'prunenet[report]'): no plot", file=sys.stderr)
        return None
    return plt
