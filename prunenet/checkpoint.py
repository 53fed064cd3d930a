"""Saving pruned models, policies and manifests without ever leaving a half-written folder.

Everything is written into a temporary sibling of the output folder and renamed into place at
the end, so a crash or an error leaves the user's file system as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .policy import SparsityPredictor

log = logging.getLogger(__name__)

POLICY_FILE = "policy.safetensors"
MANIFEST_FILE = "prunenet.json"


class OutputFolderError(ValueError):
    """The output folder is unsafe to write (non-empty, or inside the source model's folder)."""


def check_output_folder(out: str | os.PathLike, source: str | os.PathLike | None, overwrite: bool) -> Path:
    """Validate ``out`` before any work is done; returns it as an absolute path.

    Raises:
        OutputFolderError: ``out`` is the source folder or inside it; ``out`` exists and is not an
            empty folder (unless ``overwrite``); ``out`` is a file.
    """
    out = Path(out).expanduser().resolve()
    if source is not None:
        src = Path(source).expanduser().resolve()
        if out == src or src in out.parents:
            raise OutputFolderError(f"refusing to write into the source model's folder: --out {out} is inside {src}")
    if out.exists():
        if not out.is_dir():
            raise OutputFolderError(f"--out {out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise OutputFolderError(f"--out {out} is not empty; pass --overwrite to replace it")
    if not out.parent.exists():
        raise OutputFolderError(f"the parent folder of --out does not exist: {out.parent}")
    return out


@contextlib.contextmanager
def atomic_folder(out: Path, resume: str | None = None):
    """Yield a temporary sibling folder; on success it replaces ``out``, on error it is deleted.

    The old ``out`` (when overwriting) is moved aside first and removed only after the new one is
    in place, so at every instant either the old or the new complete folder exists.

    With ``resume`` (a digest of the inputs), the temporary folder is ``.NAME.partial-RESUME`` and
    an existing one is reused: what a killed run (``SIGKILL``, power loss: no chance to clean up)
    finished there is found by the same command run again. Errors still delete it.
    """
    out = Path(out)
    if resume is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    else:
        tmp = resume_folder(out, resume)
        if tmp.is_dir():
            log.info("resuming the interrupted write in %s", tmp)
        tmp.mkdir(mode=0o700, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def resume_folder(out: Path, resume: str) -> Path:
    """The temporary folder :func:`atomic_folder` uses for ``out`` with a ``resume`` digest."""
    return Path(out).parent / f".{Path(out).name}.partial-{resume}"


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
    n, d = state["proj.weight"].shape
    policy = SparsityPredictor(d, n)
    policy.load_state_dict(state)
    return policy


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write ``prunenet.json`` (indented JSON; index lists stay on one line each)."""
    with open(folder / MANIFEST_FILE, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


def read_manifest(folder: str | os.PathLike) -> dict:
    """Read ``prunenet.json`` from a folder written by ``compress``."""
    with open(Path(folder) / MANIFEST_FILE) as f:
        return json.load(f)


def kept_indices_to_json(keeps: list[torch.Tensor]) -> list[list[int]]:
    """Kept neuron indices per layer as plain lists for the manifest."""
    return [keep.tolist() for keep in keeps]
