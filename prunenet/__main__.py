"""``python -m prunenet``: the same as the ``prunenet`` console script."""

from .cli import entry

if __name__ == "__main__":
    entry()
