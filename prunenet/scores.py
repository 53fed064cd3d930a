"""Neuron scores on disk: ``scores.safetensors``, written beside every model an activation-based method pruned.

The activation scores of ``selfcal`` do not depend on the ratio: saved once, they prune the same model at any
other ratio (``--scores FILE``, ``compress --ratio 0.1,0.2,0.3``) without running it again, keeping the very
neurons a fresh run at that ratio keeps (both take the ``k`` largest of the same float32 scores,
:func:`prunenet.selfcal.top_k`).

The file holds:

* ``scores``: ``(U, n)`` float32, one row per FFN unit (a block, or one expert of a block), higher kept first;
* ``probe_ids``: ``(B, T)`` int64, the self-generated probes the scores were measured on, so that compensation
  (which refits the kept columns on the same tokens) needs no new probes. Windows of ``--calibration`` text are
  the user's text and are not stored: their SHA-256 is, and compensation asks for the same text again.

and, in its metadata, the method, score rule, probe settings, the calibration record and the model's fingerprint
(:func:`model_fingerprint`): a file is refused, with one line, for any model it was not measured on.

Shapes: ``U`` FFN units, ``n`` FFN width, ``B`` probe sequences of ``T`` tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SCORES_FILE = "scores.safetensors"
FORMAT = "prunenet.scores"
VERSION = 1

_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash", "_attn_implementation",
     "_attn_implementation_autoset", "output_attentions", "output_hidden_states", "return_dict", "use_cache"}
)  # fmt: skip
"""Config fields that say how a model was loaded or run, not what it is: left out of the fingerprint, so a model
loaded in another dtype or by another ``transformers`` version has the same one."""


def _canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def ids_sha256(ids: torch.Tensor) -> str:
    """SHA-256 of token ids ``(B, T)``, as int64 in row-major order: which tokens scores were measured on."""
    return _sha256(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())


def model_fingerprint(adapter, config) -> dict:
    """What identifies the model a file's scores belong to, from its config alone (no weights needed):

    ``model_type``, ``units`` and ``width`` (the shape of the scores), ``hidden`` (the FFN's input size), the
    SHA-256 of the config (less :data:`_VOLATILE_CONFIG_KEYS`) and of the names of every FFN tensor as the
    checkpoint stores them (their shapes follow from ``units``, ``width`` and ``hidden``)."""
    as_dict = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    layers = range(adapter.num_layers(config))
    names = [name for layer in layers for name, _, _ in adapter.stored_tensors(layer, config)]
    return {
        "model_type": config.model_type,
        "units": adapter.num_units(config),
        "width": adapter.ffn_width(config),
        "hidden": adapter.hidden_size(config),
        "config_sha256": _sha256(_canonical_json(as_dict)),
        "tensors_sha256": _sha256("\n".join(names)),
    }


@dataclass(frozen=True)
class NeuronScores:
    """One model's activation scores and how they were measured.

    Attributes:
        scores: ``(U, n)`` float32 CPU, higher kept first.
        method: the ``--method`` that measured them (``"selfcal"``).
        score: the score rule (:data:`prunenet.selfcal.SCORES`).
        probes: ``{"sequences": B, "length": T, "seed": s}``: the settings the probes or windows were drawn with.
        ids_sha256: :func:`ids_sha256` of the tokens the scores were measured on.
        probe_ids: ``(B, T)`` int64 CPU self-generated probes, or ``None`` for windows of ``--calibration`` text.
        calibration: the manifest's calibration record of that text, or ``None``.
        fingerprint: :func:`model_fingerprint` of the model measured.
        file_sha256: the SHA-256 of the file they were read from (:func:`load_scores`), else ``None``.
    """

    scores: torch.Tensor
    method: str
    score: str
    probes: dict
    ids_sha256: str
    fingerprint: dict
    probe_ids: torch.Tensor | None = None
    calibration: dict | None = None
    file_sha256: str | None = None

    def keeps(self, k: int) -> list[torch.Tensor]:
        """Per unit, the sorted ``(k,)`` int64 indices of the ``k`` highest scores (ties: the lower index)."""
        from .selfcal import top_k

        return [top_k(row, k) for row in self.scores]

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (a safetensors file; the metadata is JSON in string fields)."""
        tensors = {"scores": self.scores.contiguous()}
        if self.probe_ids is not None:
            tensors["probe_ids"] = self.probe_ids.contiguous()
        metadata = {
            "format": FORMAT,
            "version": str(VERSION),
            "method": self.method,
            "score": self.score,
            "probes": json.dumps(self.probes),
            "ids_sha256": self.ids_sha256,
            "calibration": json.dumps(self.calibration),
            "fingerprint": json.dumps(self.fingerprint),
        }
        save_file(tensors, os.fspath(path), metadata=metadata)

    def check_model(self, fingerprint: dict, shown: str) -> None:
        """Raise ``ValueError`` (one line) unless these scores were measured on the model of ``fingerprint``."""
        mine = self.fingerprint
        for key, what in (("model_type", "model type"), ("units", "FFN units"), ("width", "FFN width"),
                          ("hidden", "hidden size")):  # fmt: skip
            if mine.get(key) != fingerprint[key]:
                raise ValueError(f"--scores {shown} was measured on another model: {what} {mine.get(key)}, this "
                                 f"model's {fingerprint[key]}")  # fmt: skip
        for key, what in (("config_sha256", "config"), ("tensors_sha256", "FFN tensor names")):
            if mine.get(key) != fingerprint[key]:
                raise ValueError(f"--scores {shown} was measured on another model: its {what} differ from this "
                                 "model's (same shapes)")  # fmt: skip


def load_scores(path: str | os.PathLike) -> NeuronScores:
    """Read and check a file :meth:`NeuronScores.save` wrote (``path`` may be a folder ``compress`` wrote).

    Raises:
        FileNotFoundError: no file there.
        ValueError (one line): not a scores file, damaged, or holding non-finite scores.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / SCORES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no scores file at {path} (compress writes {SCORES_FILE} with --method selfcal)")
    try:
        with safe_open(os.fspath(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"could not read the scores file {path}: {err}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a prunenet scores file (no {FORMAT!r} format in its metadata)")
    if meta.get("version") != str(VERSION):
        raise ValueError(f"{path} is a scores file of version {meta.get('version')}; this prunenet reads {VERSION}")
    try:
        probes, fingerprint = json.loads(meta["probes"]), json.loads(meta["fingerprint"])
        calibration = json.loads(meta["calibration"])
        method, score, ids_hash = meta["method"], meta["score"], meta["ids_sha256"]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the scores file {path} is damaged: its metadata lacks or garbles {err}") from None
    scores, ids = tensors.get("scores"), tensors.get("probe_ids")
    if scores is None or scores.dtype != torch.float32 or scores.dim() != 2 or not scores.numel():
        raise ValueError(f"the scores file {path} is damaged: 'scores' must be a (units, width) float32 tensor")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"the scores file {path} holds non-finite scores (NaN or infinity)")
    if (scores.shape[0], scores.shape[1]) != (fingerprint.get("units"), fingerprint.get("width")):
        raise ValueError(f"the scores file {path} is damaged: scores of shape {tuple(scores.shape)}, its metadata "
                         f"says ({fingerprint.get('units')}, {fingerprint.get('width')})")  # fmt: skip
    if ids is not None and (ids.dtype != torch.int64 or ids.dim() != 2 or ids_sha256(ids) != ids_hash):
        raise ValueError(f"the scores file {path} is damaged: its probe ids do not match their SHA-256")
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return NeuronScores(scores, method, score, probes, ids_hash, fingerprint, ids, calibration, digest)
