"""The two ways getting a model fails: not found, or found but not loadable."""

from __future__ import annotations


class ModelNotFoundError(FileNotFoundError):
    """The model spec names neither the embedded model, an existing model folder, nor a reachable hub id."""


class ModelLoadError(RuntimeError):
    """The model was found but its config, tokenizer or weights could not be loaded."""
