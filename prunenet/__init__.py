"""PruneNet: calibration-free structured pruning of transformer FFNs.

The Python API (the command line ``prunenet`` calls the same functions)::

    import prunenet

    result = prunenet.prune_(model, 0.2, method="selfcal")  # an in-memory transformers model, in place
    prunenet.compress("smollm2-135m", "pruned", 0.2)         # a folder, checkpoint or hub id -> a folder

Both take the options of :class:`~prunenet.config.PruneConfig` / :class:`~prunenet.config.CompressConfig`
as keywords and raise the same one-line ``ValueError``s as the command line. Importing this package is
light: torch and transformers load on first use.
"""

__version__ = "0.1.0"

__all__ = [
    "CompressConfig",
    "CompressResult",
    "PruneConfig",
    "PruneResult",
    "SELECTORS",
    "compress",
    "load_model",
    "prune_",
]

_LAZY = {
    "compress": "pipeline",
    "prune_": "pipeline",
    "CompressResult": "pipeline",
    "PruneResult": "pipeline",
    "CompressConfig": "config",
    "PruneConfig": "config",
    "SELECTORS": "selectors",
    "load_model": "models",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'prunenet' has no attribute {name!r}")
