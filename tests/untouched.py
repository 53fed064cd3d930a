"""What the tests check of a refused or failed run: nothing on disk changed, no temporary folder left, and one
line said why."""

from __future__ import annotations

import os
from pathlib import Path

from prunenet.cli import main


def snapshot(*roots: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under ``roots``, files with their size and modification time: equal snapshots mean
    nothing was created, deleted or written (a folder's own mtime changes with a lock taken and released)."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            seen.update((str(Path(dirpath, name)), None) for name in dirnames)
            for name in filenames:
                st = Path(dirpath, name).lstat()
                seen[str(Path(dirpath, name))] = (st.st_size, st.st_mtime_ns)
    return seen


def error_line(stderr: str) -> str:
    """The one line that is not a log line; fails unless there is exactly one and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("prunenet: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def leftovers(parent: Path, name: str = "out") -> list[str]:
    """The temporary folders beside ``parent/name`` that a run on that output makes (``.name.*``), sorted."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def refused(argv: list[str], capsys, *roots: Path) -> str:
    """Run ``argv``: exit code 2, one line on stderr besides log lines, no traceback, nothing under ``roots``
    created, changed or removed. Returns the line."""
    before = snapshot(*roots)
    code = main(argv)
    line = error_line(capsys.readouterr().err)
    assert code == 2, line
    assert line.startswith(f"prunenet {argv[0]}: error: ")
    assert snapshot(*roots) == before
    return line
