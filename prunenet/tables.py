"""Aligned plain-text and Markdown tables, and byte sizes, for command output and reports."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(headers: Sequence[str] | None, rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> str:
    """Rows as columns separated by two spaces, padded to the widest cell; ``headers`` (optional) underlined.

    Columns whose index is in ``right`` are right-aligned (numbers); the rest left-aligned.
    """
    cells = [[str(c) for c in row] for row in ([list(headers)] if headers else []) + [list(r) for r in rows]]
    if not cells:
        return ""
    ncols = max(len(row) for row in cells)
    cells = [row + [""] * (ncols - len(row)) for row in cells]
    widths = [max(len(row[i]) for row in cells) for i in range(ncols)]

    def line(row: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        return "  ".join(padded).rstrip()

    out = [line(row) for row in cells]
    if headers:
        out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` inside cells escaped)."""

    def line(row: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *(line(r) for r in rows)])


def format_bytes(nbytes: int) -> str:
    """``"1.50 GiB"`` from a gibibyte up, then ``"12 MiB"``, ``"40 KiB"``, ``"512 B"``."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.0f} {unit}"
    return f"{nbytes} B"
