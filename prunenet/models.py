"""Loading a causal LM and its tokenizer from a model spec, with one-line errors for what cannot be loaded."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import torch

from .config import DEFAULT_MODEL  # noqa: F401  (tests/golden.py imports it from here)
from .embedded import ensure_default_model  # noqa: F401  (tests/golden.py imports it from here)
from .model_errors import ModelLoadError
from .resolve import resolve_model
from .validate import check_finite_weights

# What a model folder's weights are called (transformers loads these; only safetensors stream).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def load_model(
    spec: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, object, Path]:
    """Load a causal LM and its tokenizer from anything :func:`~prunenet.resolve.resolve_model` accepts.

    Returns:
        ``(model, tokenizer, path)``: the model in eval mode on ``device`` in ``dtype``, its tokenizer,
        and the local folder both came from.

    Raises:
        ModelNotFoundError: see :func:`~prunenet.resolve.resolve_model`.
        ModelLoadError: the folder's config, tokenizer or weights cannot be loaded (unknown model type,
            truncated or corrupt safetensors, ...); the message names the folder and the reason.
        ValueError: a weight holds NaN or infinity (naming it): every measurement or result made from such a
            model would be meaningless, or copied into an output.
    """
    path = resolve_model(spec)
    config = _read_config(path)
    _require_weights(path)
    tokenizer = read_tokenizer(path)
    model = _read_weights(path, config, dtype)
    check_finite_weights(model, where=str(path))
    model.to(device)
    model.eval()
    return model, tokenizer, path


def _read_config(path: Path):
    """The folder's ``transformers`` config."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as err:  # unknown model_type, malformed JSON, ...
        raise ModelLoadError(f"could not read the model config in {path}: {err}") from err


def _require_weights(path: Path) -> None:
    """A ``config.json`` without weights beside it: an error saying what is missing and what to do."""
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ModelLoadError(
            f"{path} has a config.json but no weights ({', '.join(WEIGHT_PATTERNS)}); copy the model's weights there"
        )


def read_tokenizer(path: Path):
    """The folder's tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise ModelLoadError(f"could not load the tokenizer from {path}: {err}") from err


def _read_weights(path: Path, config, dtype: torch.dtype) -> torch.nn.Module:
    """The model of ``config``'s auto class with the folder's weights in ``dtype``, on the CPU."""
    import transformers

    from .adapters import auto_class_name

    try:
        with _load_report_held() as report:
            return getattr(transformers, auto_class_name(config)).from_pretrained(path, config=config, dtype=dtype)
    except Exception as err:
        mismatch = _first_size_mismatch(report)
        if mismatch is not None:  # the error itself only says "look at the above report!"
            raise ModelLoadError(
                f"could not load model weights from {path}: {mismatch} (a config.json field edited by hand, or "
                "another model's weights)"
            ) from err
        raise ModelLoadError(f"could not load model weights from {path}: {err}{_weights_hint(err)}") from err


@contextlib.contextmanager
def _load_report_held():
    """Yield a list that collects transformers' "LOAD REPORT" (its table of weights it could not load) instead
    of printing it: a load that then fails says what went wrong in one line (:func:`_first_size_mismatch`);
    one that goes on logs the report as transformers would have."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            held.append(record)
            return False
        return True

    reporter = logging.getLogger("transformers.modeling_utils")  # the logger transformers 5 reports through
    reporter.addFilter(hold)
    try:
        yield held
    finally:
        reporter.removeFilter(hold)
    for record in held:  # reached only when the load succeeded
        reporter.handle(record)


def _first_size_mismatch(report: list[logging.LogRecord]) -> str | None:
    """The first tensor of a held load report whose checkpoint shape is not the config's, in words."""
    row = re.compile(
        r"^(\S[^|]*?)\s*\|\s*MISMATCH\s*\|.*ckpt: torch\.Size\(\[([^]]*)\]\) vs model: ?torch\.Size\(\[([^]]*)\]\)"
    )
    for record in report:
        for line in re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()).splitlines():
            m = row.match(line)
            if m:
                return f"{m.group(1)} is ({m.group(2)}) in the checkpoint, but its config.json makes it ({m.group(3)})"
    return None


def _weights_hint(err: BaseException) -> str:
    """Blame the file only for errors that come from reading it."""
    from safetensors import SafetensorError

    corrupt = isinstance(err, SafetensorError | OSError | EOFError) or any(
        word in str(err).lower() for word in ("header", "deserializ", "truncat", "incomplete", "out of bounds")
    )
    return "; the file may be truncated or corrupt" if corrupt else ""
