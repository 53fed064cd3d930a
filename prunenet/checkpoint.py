"""Policies and manifests on disk: ``policy.safetensors`` and ``prunenet.json``.

Where and how output folders are written (safely, atomically) is :mod:`prunenet.output`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .policy import SparsityPredictor
from .validate import check_finite

log = logging.getLogger(__name__)

POLICY_FILE = "policy.safetensors"
MANIFEST_FILE = "prunenet.json"
MANIFEST_FILES_KEY = "files"
"""``prunenet.json`` lists every entry of its folder under this key: how an output is recognised as prunenet's."""
PARTIAL_MARKER = ".prunenet-partial"
"""File inside every temporary folder of a run (never part of an output): only marked folders are swept."""


def save_policy(policy: SparsityPredictor, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a policy's parameters (and string metadata) to a safetensors file."""
    state = {name: t.detach().cpu().contiguous() for name, t in policy.state_dict().items()}
    d, n = policy.shape
    save_file(state, str(path), metadata={"hidden_size": str(d), "ffn_width": str(n), **(metadata or {})})


def load_policy(path: str | os.PathLike) -> SparsityPredictor:
    """Load a policy saved by :func:`save_policy`; ``path`` may also be a folder written by ``compress``.

    Raises:
        FileNotFoundError: no policy there.
        ValueError: the file is not a PruneNet policy or is corrupt.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / POLICY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no policy file at {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"could not read the policy {path}: {err}") from None
    if set(state) != {"proj.weight", "proj.bias", "row_weights"}:
        raise ValueError(f"{path} is not a PruneNet policy (tensors: {sorted(state)})")
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if not t.is_floating_point()})
    if dtypes:
        raise ValueError(f"the policy {path} is damaged: its tensors are {', '.join(dtypes)}, not floating point")
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    if len(shapes["proj.weight"]) != 2:
        raise ValueError(f"the policy {path} is damaged: proj.weight has shape {shapes['proj.weight']}, not (n, d)")
    n, d = shapes["proj.weight"]
    expected = {"proj.weight": (n, d), "proj.bias": (n,), "row_weights": (n, 1)}
    if shapes != expected:
        raise ValueError(f"the policy {path} is damaged: its tensors have shapes {shapes}, expected {expected}")
    for name, tensor in state.items():
        check_finite(tensor, f"the policy {path} ({name})", "it was saved from a diverged training run: train again")
    policy = SparsityPredictor(d, n)
    policy.load_state_dict(state)
    return policy


def strict_json(value) -> tuple[object, list[str]]:
    """``value`` with every NaN/infinite float replaced by ``None``, and where those were (``"a.b[2]"``).

    Python's ``json`` writes ``NaN`` and ``Infinity``, which strict parsers (browsers, ``jq``, most
    languages) reject; ``null`` is what JSON has for "no number".
    """
    replaced: list[str] = []

    def clean(v, where: str):
        if isinstance(v, float) and not math.isfinite(v):
            replaced.append(where or "(top level)")
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{where}.{k}" if where else str(k)) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return v

    return clean(value, ""), replaced


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write ``prunenet.json``, last: strict, indented JSON (non-finite numbers become ``null``, with a
    warning), listing every entry of ``folder`` under ``"files"``."""
    files = sorted({*os.listdir(folder), MANIFEST_FILE} - {PARTIAL_MARKER})
    manifest, replaced = strict_json({**manifest, MANIFEST_FILES_KEY: files})
    if replaced:
        log.warning("%s: not finite, written as null: %s", MANIFEST_FILE, ", ".join(replaced))
    with open(folder / MANIFEST_FILE, "w") as f:
        json.dump(manifest, f, indent=1, allow_nan=False)
        f.write("\n")


def read_manifest(folder: str | os.PathLike) -> dict:
    """Read ``prunenet.json`` from a folder written by ``compress``.

    Raises:
        OSError: it cannot be read.
        ValueError: it is not JSON, or is nested deeper than Python's parser goes (not one prunenet wrote).
    """
    with open(Path(folder) / MANIFEST_FILE) as f:
        try:
            return json.load(f)
        except RecursionError:
            raise ValueError(f"{Path(folder) / MANIFEST_FILE} is nested too deeply to be a prunenet manifest") from None


def kept_indices_to_json(keeps: list[torch.Tensor]) -> list[list[int]]:
    """Kept neuron indices per layer as plain lists for the manifest."""
    return [keep.tolist() for keep in keeps]


def declare_torch_dtype(folder: Path) -> None:
    """Write ``torch_dtype`` beside ``dtype`` in ``folder``'s config.json, naming the same dtype.

    transformers >= 4.56 writes the dtype as ``dtype`` alone, but readers built on older transformers read only
    ``torch_dtype`` (vLLM's and SGLang's releases before then, tools reading the raw JSON): without it they take
    the model for float32 and serve it in float16. Both keys name the same dtype, and transformers 5 keeps
    ``dtype`` and drops ``torch_dtype`` on load: the config reloads identically (tests/test_serving_configs.py)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.get("dtype") is not None:
        config["torch_dtype"] = config["dtype"]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # as transformers writes it
