"""Resolving a model spec to a local Hugging Face folder: the embedded model's name, a local folder, or a hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .config import DEFAULT_MODEL
from .embedded import ensure_default_model
from .model_errors import ModelNotFoundError

# Files worth fetching from the hub: config, tokenizer and safetensors weights (no pickles, no code).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(spec: str) -> bool:
    """Specs that can only mean a local path (hub ids are ``name`` or ``owner/name``)."""
    return (
        spec.startswith((".", "~", "/", os.sep))
        or "\\" in spec
        or spec.count("/") > 1
        or spec.endswith("/")
        or os.path.isabs(spec)
    )


def _from_hub(spec: str) -> Path:
    if not _HUB_ID.match(spec) or "--" in spec or ".." in spec or len(spec) > 96:
        raise ModelNotFoundError(f"{spec!r} is neither an existing model folder nor a valid Hugging Face hub id")
    offline_hint = (
        f"offline runs need a local model folder or the embedded default {DEFAULT_MODEL!r}; "
        f"no local folder named {spec!r} exists either"
    )
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(spec, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # not found, gated, offline, DNS failure, HTTP errors: all mean "cannot get it"
        raise ModelNotFoundError(
            f"could not get {spec!r} from the Hugging Face hub (the hub could not be reached, or no such model "
            f"id): {type(err).__name__}: {err}; {offline_hint}"
        ) from err
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"the hub model {spec!r} has no config.json (downloaded to {path})")
    if not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"the hub model {spec!r} has no safetensors weights; only safetensors are loaded")
    return path


def resolve_model(spec: str | os.PathLike) -> Path:
    """Turn a model spec into a local Hugging Face model folder.

    * ``"smollm2-135m"`` (any case): the embedded SmolLM2-135M-Instruct, converted once into
      ``cache_dir()/smollm2-135m`` (see :func:`ensure_default_model`);
    * an existing folder: that folder (it must contain ``config.json``);
    * a path (starts with ``.``, ``~`` or ``/``, or has more than one ``/``) that does not exist: an error;
    * anything else: a hub id, fetched with ``huggingface_hub.snapshot_download`` (config, tokenizer,
      safetensors only).

    Raises:
        ModelNotFoundError: with a message saying which of the above failed and what to do.
    """
    text = os.fspath(spec).strip()
    if not text:
        raise ModelNotFoundError(f"empty model name; use {DEFAULT_MODEL!r}, a local folder or a hub id")
    if text.lower() == DEFAULT_MODEL:
        return ensure_default_model()
    local = Path(text).expanduser()
    if os.path.lexists(local) and not local.exists():
        raise ModelNotFoundError(f"{local} is a broken symbolic link or a loop of symbolic links")
    if local.exists():
        if not local.is_dir():
            raise ModelNotFoundError(f"{local} is a file; a model must be a Hugging Face folder with config.json")
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{local} is not a Hugging Face model folder: it has no config.json")
        return local
    if _looks_like_path(text):
        raise ModelNotFoundError(f"no such folder: {local.absolute()}")
    return _from_hub(text)
