"""Regenerate the documentation blocks that are derived from the code.

Usage: python tools/gen_docs.py [--check]

* ``methods`` in ``docs/methods.md``: the selector registry (:func:`prunenet.selectors.markdown_table`).

``--check`` changes nothing and exits 1 when a block is out of date (``tests/test_docs.py`` checks too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import replace_block  # noqa: E402

from prunenet.selectors import markdown_table  # noqa: E402

BLOCKS = {("methods", ROOT / "docs" / "methods.md"): markdown_table}


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
