"""Where a measurement comes from: the checkout's git revision and the CPU's model name, for the rows every
benchmark and tools/gpu-check record. Imports no torch: tools/gpu-check's parent process must not."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_revision() -> str:
    """Short hash of HEAD, with ``-dirty`` when tracked files have uncommitted changes (``unknown`` outside git)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], capture_output=True, text=True, cwd=ROOT)
    except OSError:
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cpu_model_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is often empty on Linux), or ``None``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
