"""What the hostile-input tests check of a refused run: nothing on disk changed, and one line said why."""

from __future__ import annotations

import os
from pathlib import Path


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
