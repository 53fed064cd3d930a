"""``python -m prunenet``: the same as the ``prunenet`` console script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
