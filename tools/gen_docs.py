"""Regenerate the documentation blocks that are derived from the code.

Usage: python tools/gen_docs.py [--check]

* ``methods`` in ``docs/methods.md``: the selector registry (:func:`prunenet.selectors.markdown_table`).
* ``families`` in ``docs/usage.md``: the coverage table of the model families (:mod:`prunenet.adapters.coverage`).
* ``keywords`` in ``docs/usage.md``: the keywords of ``prune_``/``compress``, from the fields of
  ``PruneConfig`` and ``CompressConfig`` and the options each selector declares.

``--check`` changes nothing and exits 1 when a block is out of date (``tests/test_docs.py`` checks too).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import replace_block  # noqa: E402

from prunenet.adapters.coverage import markdown_table as coverage_table  # noqa: E402
from prunenet.config import CompressConfig, PruneConfig, flag  # noqa: E402
from prunenet.selectors import SELECTORS, markdown_table  # noqa: E402


def keyword_table() -> str:
    """Markdown table: each config field's keyword, flag, default, dataclass, and the selector that reads it."""
    owner = {option: s.name for s in SELECTORS.values() for option in s.options}
    own = {f.name for f in dataclasses.fields(PruneConfig)}
    rows = ["| keyword | flag | default | config |", "|---|---|---|---|"]
    for f in dataclasses.fields(CompressConfig):
        default = "(required)" if f.default is dataclasses.MISSING else f"`{f.default!r}`"
        where = "PruneConfig" if f.name in own else "CompressConfig"
        reader = f" ({owner[f.name]})" if f.name in owner else ""
        flags = f"`{flag(f)}`"
        if f.metadata["cli"].get("action") == "boolean-optional":
            flags += f" / `--no-{flag(f)[2:]}`"
        rows.append(f"| `{f.name}` | {flags} | {default} | `{where}`{reader} |")
    return "\n".join(rows)


BLOCKS = {
    ("methods", ROOT / "docs" / "methods.md"): markdown_table,
    ("keywords", ROOT / "docs" / "usage.md"): keyword_table,
    ("families", ROOT / "docs" / "usage.md"): coverage_table,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a block is out of date; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for (name, page), make in BLOCKS.items():
        text = page.read_text(encoding="utf-8")
        updated = replace_block(text, name, make())
        if updated != text:
            stale.append(f"{page.relative_to(ROOT)}:{name}")
            if not args.check:
                page.write_text(updated, encoding="utf-8")
    if stale:
        print(("out of date: " if args.check else "updated: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
