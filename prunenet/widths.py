"""The arithmetic of a pruning ratio: how many of ``n`` neurons (or heads) a ratio keeps."""

from __future__ import annotations

import math


def kept_width(ratio: float, width: int) -> int:
    """``k = floor((1 - ratio) * n)``, robust to float rounding (``(1 - 0.3) * 10`` is ``6.99..``)."""
    return math.floor((1.0 - ratio) * width + 1e-9)
