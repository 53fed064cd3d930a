"""Where prunenet keeps files of its own: the cache of converted models."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models are kept: ``$PRUNENET_CACHE``, default ``~/.cache/prunenet`` (also when it is set
    but empty, as a shell's ``PRUNENET_CACHE=`` leaves it: an empty path would mean the current folder)."""
    return Path(os.environ.get("PRUNENET_CACHE") or "~/.cache/prunenet").expanduser()
