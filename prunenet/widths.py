"""The arithmetic of a pruning ratio: how many of ``n`` neurons (or heads) a ratio keeps."""

from __future__ import annotations

import math


def kept_width(ratio: float, width: int, multiple: int = 1) -> int:
    """``k = floor((1 - ratio) * n)``, robust to float rounding (``(1 - 0.3) * 10`` is ``6.99..``), then rounded
    down to a multiple of ``multiple`` but never below it (nor above ``n``): the widths GEMM tiles and
    quantization blocks want. A ratio that keeps everything keeps everything whatever the multiple."""
    k = math.floor((1.0 - ratio) * width + 1e-9)
    if multiple > 1 and k < width:
        k = max(k // multiple * multiple, min(multiple, width))
    return k


def reached_ratio(kept: int, width: int) -> float:
    """The fraction of neurons actually removed, ``1 - k / n`` (rounded to 6 places for the manifest)."""
    return round(1.0 - kept / width, 6)
