"""The user's own text for self-calibration (``--calibration PATH``): read and checked, then cut into token windows.

* :func:`read_calibration`: the files behind the paths, read and checked before any weights load (a bad path
  fails in a moment, even for a model that takes minutes to load); nothing is written anywhere.
* :func:`calibration_windows`: ``(B, T)`` token ids, each row the tokenizer's document prefix followed by
  consecutive tokens of one document, chosen with a seeded generator; and their record for the manifest.

A path is a text file, or a folder whose ``.txt``, ``.md`` and ``.jsonl`` files are read (sorted by relative
path; hidden files and folders are skipped). A text file is one document; a ``.jsonl`` file is one document per
line, its ``"text"`` field.

Shapes: ``B`` windows (``--probe-sequences``) of ``T`` tokens (``--probe-length``, capped at the model's
context), ``P`` tokens of document prefix, ``W = T - P`` tokens of text per window.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .perplexity import document_prefix, tokenize_prefix

SUFFIXES = (".txt", ".md", ".jsonl")
"""The files of a folder that are read; a file named directly is read whatever its name."""

POOL_WINDOWS = 16
"""Text tokenized per window needed: documents are tokenized in a seeded order until they hold
``POOL_WINDOWS * B * W`` tokens (each at most that many), so a large folder is not tokenized whole for
``B`` windows, and the windows still come from many documents."""


class CalibrationError(ValueError):
    """The calibration text cannot be used (a missing path, a binary file, too few tokens): one line."""


@dataclass(frozen=True)
class CalibrationFile:
    """One file read: ``path`` as given (a folder's file: the folder as given joined with its relative path),
    ``resolved`` (absolute, links resolved), its size in ``bytes``, the SHA-256 of those bytes, and how many
    documents it holds."""

    path: str
    resolved: str
    bytes: int
    sha256: str
    documents: int


@dataclass(frozen=True)
class Document:
    """One document: its ``text``, the index of its file in :attr:`CalibrationText.files` and, in a ``.jsonl``
    file, its 1-based ``line`` (``None`` for a whole file)."""

    text: str
    file: int
    line: int | None = None


@dataclass(frozen=True)
class CalibrationText:
    """The documents of ``--calibration``, in file order, and the files they come from."""

    files: tuple[CalibrationFile, ...]
    documents: tuple[Document, ...]
    read_seconds: float


@dataclass(frozen=True)
class CalibrationWindows:
    """What self-calibration runs on: ``ids`` ``(B, T)`` int64 CPU, and ``record``, its manifest entry."""

    ids: torch.Tensor
    record: dict


# -- reading ------------------------------------------------------------------------------------------------


def read_calibration(paths: Sequence[str | os.PathLike]) -> CalibrationText:
    """Read and check every file behind ``paths`` (files or folders), in the order given.

    A file reached twice (named and inside a named folder, say) is read once.

    Raises:
        CalibrationError: a path does not exist, a folder holds no text files, a file cannot be read (e.g.
            permissions), is binary (NUL bytes) or not UTF-8, holds only whitespace, or a ``.jsonl`` line is not
            JSON or has no string ``"text"``.
    """
    tick = time.perf_counter()
    files: list[CalibrationFile] = []
    documents: list[Document] = []
    seen: set[str] = set()
    for given in paths:
        for shown, file in _files_of(Path(os.fspath(given)).expanduser()):
            resolved = str(file.resolve())
            if resolved in seen:
                continue
            seen.add(resolved)
            data = _read_bytes(shown, file)
            texts = _documents_of(shown, data, jsonl=file.suffix.lower() == ".jsonl")
            index = len(files)
            documents += [Document(text, index, line) for line, text in texts]
            files.append(CalibrationFile(shown, resolved, len(data), hashlib.sha256(data).hexdigest(), len(texts)))
    return CalibrationText(tuple(files), tuple(documents), time.perf_counter() - tick)


def _files_of(path: Path) -> list[tuple[str, Path]]:
    """``(shown name, path)`` of the files ``path`` stands for: itself, or a folder's text files."""
    if not path.exists():
        what = "is a broken symbolic link" if os.path.lexists(path) else "does not exist"
        raise CalibrationError(f"--calibration {path} {what}")
    if not path.is_dir():
        return [(str(path), path)]
    found = []
    for folder, dirs, names in os.walk(path, onerror=_unlistable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .cache: not the user's text
        for name in names:
            if not name.startswith(".") and Path(name).suffix.lower() in SUFFIXES:
                found.append(Path(folder, name).relative_to(path))
    if not found:
        raise CalibrationError(f"--calibration {path} holds no {', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]} files")
    return [(str(path / relative), path / relative) for relative in sorted(found, key=lambda p: p.parts)]


def _unlistable(err: OSError) -> None:
    """A folder that cannot be listed is an error, not a folder without text (``os.walk`` would skip it)."""
    reason = "permission denied" if isinstance(err, PermissionError) else err.strerror or str(err)
    raise CalibrationError(f"--calibration {err.filename} cannot be read: {reason}")


def _read_bytes(shown: str, file: Path) -> bytes:
    """The bytes of a regular file; a FIFO or a device is refused (reading it could block or never end)."""
    try:
        if not stat.S_ISREG(os.stat(file).st_mode):
            raise CalibrationError(f"--calibration {shown} is not a regular file (a FIFO or a device?)")
        with open(file, "rb") as f:
            return f.read()
    except PermissionError:
        raise CalibrationError(f"--calibration {shown} cannot be read: permission denied") from None
    except OSError as err:
        raise CalibrationError(f"--calibration {shown} cannot be read: {err.strerror or err}") from None


def _documents_of(shown: str, data: bytes, jsonl: bool) -> list[tuple[int | None, str]]:
    """``(line, text)`` of each document in a file's bytes (``line`` ``None`` for a whole-file document)."""
    if b"\0" in data:
        raise CalibrationError(f"--calibration {shown} is a binary file (it holds NUL bytes), not text")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is no part of the text
    except UnicodeDecodeError as err:
        raise CalibrationError(f"--calibration {shown} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    documents = _jsonl_documents(shown, text) if jsonl else [(None, text)] if text.strip() else []
    if not documents:
        raise CalibrationError(f"--calibration {shown} holds no text (it is empty or only whitespace)")
    return documents


def _jsonl_documents(shown: str, text: str) -> list[tuple[int, str]]:
    """One document per non-blank line: its ``"text"`` field."""
    documents = []
    for number, line in enumerate(text.split("\n"), start=1):  # split("\n"), not splitlines(): JSON's line breaks
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            reason = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
            raise CalibrationError(f"--calibration {shown} line {number} is not JSON ({reason})") from None
        value = record.get("text") if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise CalibrationError(f'--calibration {shown} line {number} has no string "text" field')
        if not value.strip():
            raise CalibrationError(f'--calibration {shown} line {number}: its "text" is empty or only whitespace')
        documents.append((number, value))
    return documents


# -- windows ------------------------------------------------------------------------------------------------


def calibration_windows(text: CalibrationText, tokenizer, sequences: int, length: int, seed: int) -> CalibrationWindows:
    """``sequences`` windows of ``length`` tokens from ``text``, the same for a seed on every path.

    Each window is the tokenizer's :func:`~prunenet.perplexity.document_prefix` (``P`` ids, e.g. Gemma's BOS;
    none for SmolLM2) followed by ``W = length - P`` consecutive tokens of one document, as the model sees a
    document's text. One ``torch.Generator`` seeded with ``seed`` first orders the documents, which are tokenized
    in that order until they hold enough text (:data:`POOL_WINDOWS`), and then draws each window's start
    uniformly over every start in those documents: a document is chosen in proportion to its usable length.
    Windows may overlap; a window never crosses from one document into the next.

    Raises:
        CalibrationError: no document has ``W`` tokens, or ``length`` leaves no room after the prefix.
    """
    prefix = document_prefix(tokenizer)
    body = length - len(prefix)
    if body < 1:
        raise CalibrationError(
            f"--probe-length {length} leaves no token of text after the tokenizer's {len(prefix)}-token document "
            "prefix; raise --probe-length"
        )
    generator = torch.Generator().manual_seed(seed)
    pool, longest, tokenized = _tokenized_pool(text, tokenizer, body, POOL_WINDOWS * sequences * body, generator)
    if not pool:
        after = f" after the tokenizer's {len(prefix)}-token document prefix" if prefix else ""
        raise CalibrationError(
            f"the --calibration text is too short: its longest document has {longest} tokens, and a window needs "
            f"{body} tokens of one document (--probe-length {length}{after}); give more text or lower --probe-length"
        )
    ends = list(itertools.accumulate(tokens.numel() - body + 1 for _, tokens in pool))  # window starts, cumulated
    picks = torch.randint(ends[-1], (sequences,), generator=generator).tolist()
    ids = torch.empty(sequences, length, dtype=torch.long)
    if prefix:
        ids[:, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
    windows = []
    for row, pick in enumerate(picks):
        j = bisect.bisect_right(ends, pick)  # the pooled document whose starts hold the pick
        start = pick - (ends[j - 1] if j else 0)
        document, tokens = pool[j]
        ids[row, len(prefix) :] = tokens[start : start + body]
        windows.append({"file": document.file, "line": document.line, "start": start})
    return CalibrationWindows(ids, _record(text, windows, tokenized, length, len(prefix)))


def _tokenized_pool(
    text: CalibrationText, tokenizer, body: int, target: int, generator: torch.Generator
) -> tuple[list[tuple[Document, torch.Tensor]], int, int]:
    """Documents in a seeded order, tokenized (at most ``target`` tokens each) until those with at least ``body``
    tokens hold ``target`` tokens. Returns those with their ``(tokens,)`` ids, the longest length seen and how many
    documents were tokenized."""
    pool, held, longest, tokenized = [], 0, 0, 0
    for i in torch.randperm(len(text.documents), generator=generator).tolist():
        document = text.documents[i]
        tokens = tokenize_prefix(tokenizer, document.text, target)
        tokenized += 1
        longest = max(longest, tokens.numel())
        if tokens.numel() >= body:
            pool.append((document, tokens))
            held += tokens.numel()
            if held >= target:
                break
    return pool, longest, tokenized


def _record(text: CalibrationText, windows: list[dict], tokenized: int, length: int, prefix: int) -> dict:
    """The manifest's ``calibration`` entry: the files (path, size, SHA-256), documents and windows used."""
    return {
        "files": [
            {"path": f.path, "resolved": f.resolved, "bytes": f.bytes, "sha256": f.sha256, "documents": f.documents}
            for f in text.files
        ],
        "documents": len(text.documents),
        "documents_tokenized": tokenized,
        "window_tokens": length,
        "prefix_tokens": prefix,
        "tokens": len(windows) * length,
        "windows": [{**w, "file": text.files[w["file"]].path} for w in windows],
    }
