"""A user's own text: read and checked once, for every command that takes one; cut into token windows for
self-calibration (``compress --calibration PATH``).

* :func:`read_calibration`: the files behind the paths, checked before any weights load (a bad path, a binary
  file, a bad encoding or ``.jsonl`` line fails in a moment, even for a model that takes minutes to load), and
  *indexed*, not kept: each file is read once in chunks (hashed, its encoding checked, its documents located),
  so memory does not grow with the size of the text. Nothing is written anywhere.
* :func:`calibration_windows`: ``(B, T)`` token ids, each row the tokenizer's document prefix followed by ``W``
  consecutive tokens of one document, drawn over the *whole* text with a seeded generator: one draw picks a
  byte of the text uniformly, which picks the document in proportion to its length and the position in it;
  only a bounded slice around that position is read and tokenized. And their record for the manifest.
* :func:`read_text_file`: one whole file as a string (``eval --text-file``, ``finetune --text-file``), under the
  same checks.

A path is a text file, or a folder whose ``.txt``, ``.md`` and ``.jsonl`` files are read (sorted by relative
path; hidden files and folders are skipped; symbolic links to folders are followed, each folder once). A text
file is one document; a ``.jsonl`` file is one document per line, its ``"text"`` field (an empty one is skipped
and counted). Text is UTF-8, or UTF-16/UTF-32 with a byte-order mark; ``.jsonl`` is UTF-8 (JSON's encoding).
Text is tokenized as text: a ``<s>`` in it is three characters, never a control token.

Shapes: ``B`` windows (``--probe-sequences``) of ``T`` tokens (``--probe-length``, capped at the model's
context), ``P`` tokens of document prefix, ``W = T - P`` tokens of text per window.
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import itertools
import json
import os
import stat
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SUFFIXES = (".txt", ".md", ".jsonl")
"""The files of a folder that are read; a file named directly is read whatever its name."""

CHUNK_BYTES = 1 << 20
"""Files are read, hashed and checked this many bytes at a time."""

SLICE_BYTES_PER_TOKEN = 16
"""Bytes of text read per token a window needs, at first (a token of text is rarely longer); doubled until the
slice holds enough tokens."""

BOMS = (  # longest first: UTF-32-LE's mark begins with UTF-16-LE's
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
"""Byte-order marks and the encodings they announce; a file without one is UTF-8."""


class CalibrationError(ValueError):
    """The user's text cannot be used (a missing path, a binary file, too few tokens): one line."""


@dataclass(frozen=True)
class CalibrationFile:
    """One file read: ``path`` as given (a folder's file: the folder as given joined with its relative path), its
    size in ``bytes``, the SHA-256 of those bytes, its ``encoding``, how many ``documents`` it holds and how many
    empty ones were skipped; ``start``: the bytes of byte-order mark before its text."""

    path: str
    file: Path
    bytes: int
    sha256: str
    encoding: str
    documents: int
    skipped: int
    start: int

    def record(self) -> dict:
        """This file in the manifest: where it was as given, what it held (never the machine's absolute path)."""
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256, "encoding": self.encoding,
                "documents": self.documents, "empty_documents_skipped": self.skipped}  # fmt: skip


@dataclass(frozen=True)
class CalibrationText:
    """The documents of a user's text, located but not loaded.

    Attributes:
        files: the files read, in order.
        doc_file, doc_line, doc_offset, doc_bytes: per document, its file's index, its 1-based ``.jsonl`` line (0
            for a whole file), and the byte offset and length of its text (a whole file: after the byte-order
            mark; a ``.jsonl`` document: its line).
    """

    files: tuple[CalibrationFile, ...]
    doc_file: array
    doc_line: array
    doc_offset: array
    doc_bytes: array

    @property
    def documents(self) -> int:
        return len(self.doc_file)

    def record(self) -> dict:
        """The manifest's record of the text: its files, documents and skipped empty documents."""
        return {
            "files": [f.record() for f in self.files],
            "documents": self.documents,
            "empty_documents_skipped": sum(f.skipped for f in self.files),
        }


@dataclass(frozen=True)
class CalibrationWindows:
    """What self-calibration runs on: ``ids`` ``(B, T)`` int64 CPU, and ``record``, its manifest entry."""

    ids: torch.Tensor
    record: dict


# -- reading ------------------------------------------------------------------------------------------------


def read_calibration(paths: Sequence[str | os.PathLike], flag: str = "--calibration") -> CalibrationText:
    """Read, check and index every file behind ``paths`` (files or folders), in the order given.

    A file reached twice (named and inside a named folder, say) is read once. Memory: a few numbers per document.

    Raises:
        CalibrationError: a path does not exist, a folder holds no text files, a file cannot be read (e.g.
            permissions), is not a regular file, is binary (NUL bytes in UTF-8), is not in its encoding, a
            ``.jsonl`` line is not JSON or has no string ``"text"``, or the whole text holds no document.
    """
    files: list[CalibrationFile] = []
    doc_file, doc_line, doc_offset, doc_bytes = array("i"), array("q"), array("q"), array("q")
    seen: set[str] = set()
    for given in paths:
        for shown, file in _files_of(Path(os.fspath(given)).expanduser(), flag):
            resolved = str(file.resolve())
            if resolved in seen:
                continue
            seen.add(resolved)
            index = len(files)
            before = len(doc_file)
            info = _index_file(shown, file, flag, index, (doc_file, doc_line, doc_offset, doc_bytes))
            files.append(CalibrationFile(shown, file, *info[:2], info[2], len(doc_file) - before, *info[3:]))
    if not doc_file:
        shown = ", ".join(f.path for f in files[:3])
        raise CalibrationError(f"{flag} {shown} holds no text: it is empty, or only whitespace")
    return CalibrationText(tuple(files), doc_file, doc_line, doc_offset, doc_bytes)


def _files_of(path: Path, flag: str) -> list[tuple[str, Path]]:
    """``(shown name, path)`` of the files ``path`` stands for: itself, or a folder's text files (symbolic links
    to folders followed, each real folder once, so a link loop ends)."""
    if not path.exists():
        what = "is a broken symbolic link" if os.path.lexists(path) else "does not exist"
        raise CalibrationError(f"{flag} {path} {what}")
    if not path.is_dir():
        return [(str(path), path)]
    found, visited = [], set()

    def unlistable(err: OSError) -> None:  # os.walk would skip a folder it cannot list: the user meant it read
        reason = "permission denied" if isinstance(err, PermissionError) else err.strerror or str(err)
        raise CalibrationError(f"{flag} {err.filename} cannot be read: {reason}")

    for folder, dirs, names in os.walk(path, onerror=unlistable, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # a link back to a folder already read
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .cache: not the user's text; sorted:
        # a folder reached twice (a link to it) is named by its first path in sorted order on every machine
        for name in names:
            if name.startswith(".") or Path(name).suffix.lower() not in SUFFIXES:
                continue
            relative = Path(folder, name).relative_to(path)
            if not Path(folder, name).exists():
                raise CalibrationError(f"{flag} {path / relative} is a broken symbolic link")
            found.append(relative)
    if not found:
        raise CalibrationError(f"{flag} {path} holds no {', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]} files")
    return [(str(path / relative), path / relative) for relative in sorted(found, key=lambda p: p.parts)]


def _open_regular(shown: str, file: Path, flag: str):
    """``file`` opened for reading in binary; a FIFO or a device is refused (reading it could block or never end)."""
    try:
        if not stat.S_ISREG(os.stat(file).st_mode):
            raise CalibrationError(f"{flag} {shown} is not a regular file (a FIFO or a device?)")
        return open(file, "rb")  # noqa: SIM115 (the caller's with-block closes it)
    except PermissionError:
        raise CalibrationError(f"{flag} {shown} cannot be read: permission denied") from None
    except OSError as err:
        raise CalibrationError(f"{flag} {shown} cannot be read: {err.strerror or err}") from None


def _encoding_of(head: bytes) -> tuple[str, int]:
    """The encoding a file's first bytes announce and the length of its byte-order mark (UTF-8 and 0 without)."""
    for bom, encoding in BOMS:
        if head.startswith(bom):
            return encoding, len(bom)
    return "utf-8", 0


def _index_file(shown: str, file: Path, flag: str, index: int, docs: tuple) -> tuple:
    """Read ``file`` once in chunks: hash it, check its encoding, append its documents to ``docs``.

    Returns ``(bytes, sha256, encoding, skipped, start)``."""
    jsonl = file.suffix.lower() == ".jsonl"
    digest, size = hashlib.sha256(), 0
    with _open_regular(shown, file, flag) as f:
        try:
            head = f.read(CHUNK_BYTES)
        except OSError as err:
            raise CalibrationError(f"{flag} {shown} cannot be read: {err.strerror or err}") from None
        encoding, start = _encoding_of(head)
        if jsonl and encoding != "utf-8":
            raise CalibrationError(f"{flag} {shown} is {encoding.upper()} JSON Lines; JSON is UTF-8: convert it")
        decoder = codecs.getincrementaldecoder(encoding)()
        lines = _JsonlDocuments(shown, flag, start, index, docs) if jsonl else None
        blank, chunk, position = True, head, 0
        while chunk:
            digest.update(chunk)
            body = chunk[start:] if position == 0 else chunk
            if encoding == "utf-8" and b"\0" in body:
                raise CalibrationError(f"{flag} {shown} is a binary file (it holds NUL bytes), not text")
            held = len(decoder.getstate()[0])  # bytes of a character the last chunk ended inside of
            try:
                text = decoder.decode(body)
            except UnicodeDecodeError as err:
                where = position + (start if position == 0 else 0) - held + err.start
                raise CalibrationError(f"{flag} {shown} is not {encoding.upper()} text (byte {where}: "
                                       f"{err.reason})") from None  # fmt: skip
            blank = blank and not text.strip()
            if lines is not None:
                lines.feed(body)
            position += len(chunk)
            size += len(chunk)
            try:
                chunk = f.read(CHUNK_BYTES)
            except OSError as err:
                raise CalibrationError(f"{flag} {shown} cannot be read: {err.strerror or err}") from None
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            ends = f"{flag} {shown} is not {encoding.upper()} text (it ends inside a character)"
            raise CalibrationError(ends) from None
    if lines is not None:
        skipped = lines.finish()
    elif blank:
        skipped = 1
    else:
        skipped = 0
        _append(docs, index, 0, start, size - start)
    return size, digest.hexdigest(), encoding, skipped, start


def _append(docs: tuple, file: int, line: int, offset: int, size: int) -> None:
    """One document into the index's columns."""
    for column, value in zip(docs, (file, line, offset, size), strict=True):
        column.append(value)


class _JsonlDocuments:
    """The documents of a ``.jsonl`` file fed chunk by chunk into the index ``docs`` (as file ``index``): each line
    whose ``"text"`` is a non-empty string; blank lines are passed over and empty texts skipped and counted."""

    def __init__(self, shown: str, flag: str, offset: int, index: int, docs: tuple):
        self.shown, self.flag, self.offset, self.index, self.docs = shown, flag, offset, index, docs
        self.pending, self.number, self.skipped = b"", 0, 0

    def feed(self, data: bytes) -> None:
        data = self.pending + data
        *complete, self.pending = data.split(b"\n")  # split on \n, not splitlines(): JSON's own line breaks
        for raw in complete:
            self._line(raw)

    def finish(self) -> int:
        """The last line, if it has no line break; returns how many empty texts were skipped."""
        if self.pending:
            self._line(self.pending)
        return self.skipped

    def _line(self, raw: bytes) -> None:
        self.number += 1
        offset, self.offset = self.offset, self.offset + len(raw) + 1
        if not raw.strip():
            return
        value = _jsonl_text(raw, self.shown, self.number, self.flag)
        if value.strip():
            _append(self.docs, self.index, self.number, offset, len(raw))
        else:
            self.skipped += 1


def _jsonl_text(raw: bytes, shown: str, number: int, flag: str) -> str:
    """The ``"text"`` of one ``.jsonl`` line."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
        raise CalibrationError(f"{flag} {shown} line {number} is not JSON ({reason})") from None
    value = record.get("text") if isinstance(record, dict) else None
    if not isinstance(value, str):
        raise CalibrationError(f'{flag} {shown} line {number} has no string "text" field')
    return value


def read_text_file(path: str | os.PathLike, flag: str = "--text-file") -> tuple[str, dict]:
    """The whole text of one file, under :func:`read_calibration`'s checks (a ``.jsonl`` file: its documents'
    texts, one per paragraph), and its manifest record (path as given, size, SHA-256, encoding).

    Raises:
        CalibrationError: as :func:`read_calibration`, and for a folder.
    """
    file = Path(os.fspath(path)).expanduser()
    if file.is_dir():
        raise CalibrationError(f"{flag} {file} is a folder, not a text file")
    text = read_calibration([file], flag)
    parts = [document_text(text, i) for i in range(text.documents)]
    return "\n\n".join(parts), text.files[0].record()


# -- windows ------------------------------------------------------------------------------------------------


def document_text(text: CalibrationText, index: int, offset: int = 0, size: int | None = None) -> str:
    """Document ``index``'s text, or for a whole-file document the text of ``size`` bytes from byte ``offset`` of
    it (cut to whole characters: a slice may begin and end inside one)."""
    file = text.files[text.doc_file[index]]
    begin, length = text.doc_offset[index], text.doc_bytes[index]
    with open(file.file, "rb") as f:
        if text.doc_line[index]:  # a .jsonl line: its "text", parsed whole
            f.seek(begin)
            value = _jsonl_text(f.read(length), file.path, text.doc_line[index], "--calibration")
            return value if size is None else value[offset : offset + size]
        size = length - offset if size is None else min(size, length - offset)
        f.seek(begin + offset)
        data = f.read(size)
    if file.encoding == "utf-8":
        skip = next((i for i, b in enumerate(data[:4]) if b & 0xC0 != 0x80), len(data))  # continuation bytes
        return codecs.getincrementaldecoder("utf-8")().decode(data[skip:])  # an incomplete last character: held
    unit = 4 if "32" in file.encoding else 2
    misaligned = (offset % unit) and unit - offset % unit
    data = data[misaligned : misaligned + (len(data) - misaligned) // unit * unit]
    return data.decode(file.encoding, errors="replace").strip("\ufffd")  # a half surrogate pair at an edge


def tokenize_text(tokenizer, text: str) -> list[int]:
    """``text``'s token ids as text: no special tokens added, and a special token's string in it (``<s>``) split
    into ordinary tokens, never read as the control token."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False,
                     verbose=False)["input_ids"]  # fmt: skip


def calibration_windows(text: CalibrationText, tokenizer, sequences: int, length: int, seed: int) -> CalibrationWindows:
    """``sequences`` windows of ``length`` tokens drawn over the whole of ``text``, the same for a seed on every path.

    Each window is the tokenizer's :func:`~prunenet.perplexity.document_prefix` (``P`` ids, e.g. Gemma's BOS;
    none for SmolLM2) followed by ``W = length - P`` consecutive tokens of one document, as the model sees a
    document's text. A ``torch.Generator`` seeded with ``seed`` draws a byte of the text uniformly: the document
    holding it (so each document in proportion to its size) and the window's start, the first word that starts
    after that byte (the slice is cut at whitespace, so that a subword tokenizer's tokens are the document's own);
    a window that would run past its document's end takes the document's last ``W`` tokens instead. A document
    shorter than ``W`` tokens cannot hold a window: a draw in it is drawn again (and once 64 draws went so, the
    documents found short are no longer drawn). Only a slice of about ``16 W`` bytes around each start is read and
    tokenized. Windows may overlap; one never crosses from one document into the next. The record gives each
    window's drawn offset.

    Raises:
        CalibrationError: ``length`` leaves no room after the prefix, or the documents long enough for a window
            are too few to draw ``sequences`` windows from (a text too short).
    """
    from .perplexity import document_prefix

    prefix = document_prefix(tokenizer)
    body = length - len(prefix)
    if body < 1:
        raise CalibrationError(
            f"--probe-length {length} leaves no token of text after the tokenizer's {len(prefix)}-token document "
            "prefix; raise --probe-length"
        )
    # A document of fewer bytes than W holds fewer than W tokens: never drawn. The others are, by size.
    sizes = [size if size >= body else 0 for size in text.doc_bytes]
    ends = list(itertools.accumulate(sizes))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.empty(sequences, length, dtype=torch.long)
    if prefix:
        ids[:, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
    windows, short, wasted = [], set(), 0
    while len(windows) < sequences and ends and ends[-1] > 0:
        pick = int(torch.randint(ends[-1], (1,), generator=generator))
        doc = bisect.bisect_right(ends, pick)
        if doc not in short:
            offset = pick - (ends[doc - 1] if doc else 0)
            tokens, offset = _window_tokens(text, tokenizer, doc, offset, body)
            if tokens is None:
                short.add(doc)
        if doc in short:  # no window in it: once 64 draws went so, the documents found short weigh nothing more
            wasted += 1
            if wasted >= 64:
                sizes = [0 if i in short else size for i, size in enumerate(sizes)]
                ends, wasted = list(itertools.accumulate(sizes)), 0
            continue
        ids[len(windows), len(prefix) :] = torch.tensor(tokens, dtype=torch.long)
        file = text.files[text.doc_file[doc]]
        windows.append({"file": file.path, "line": text.doc_line[doc] or None, "offset": offset})
    if len(windows) < sequences:
        after = f" after the tokenizer's {len(prefix)}-token document prefix" if prefix else ""
        raise CalibrationError(
            f"the --calibration text is too short: {len(windows)} of {sequences} windows of {body} tokens of one "
            f"document each (--probe-length {length}{after}) could be drawn from its {text.documents} document(s); "
            "give more text, or lower --probe-length or --probe-sequences"
        )
    record = {**text.record(), "window_tokens": length, "prefix_tokens": len(prefix), "tokens": sequences * length,
              "windows": windows}  # fmt: skip
    return CalibrationWindows(ids, record)


def _word_edges(chunk: str, cut_start: bool, cut_end: bool) -> tuple[str, bool, bool]:
    """``chunk`` cut to whole words: from the whitespace before its first word start (``cut_start``) to the end
    of its last whole word (``cut_end``), as a tokenizer that splits words at whitespace (byte-level BPE,
    SentencePiece) would cut the document; and whether each cut was found (a text without whitespace has none)."""
    head = tail = False
    if cut_start:
        i = next((i for i in range(len(chunk) - 1) if chunk[i].isspace() and not chunk[i + 1].isspace()), None)
        if i is not None:
            chunk, head = chunk[i:], True
    if cut_end:
        j = next((j for j in range(len(chunk) - 1, 0, -1) if chunk[j].isspace() and not chunk[j - 1].isspace()), None)
        if j is not None:
            chunk, tail = chunk[:j], True
    return chunk, head, tail


def _window_tokens(text: CalibrationText, tokenizer, doc: int, offset: int, body: int) -> tuple[list | None, int]:
    """``body`` tokens of document ``doc`` from the first word that starts after ``offset`` (bytes; in a ``.jsonl``
    document, characters of its text, at the same fraction of it), or its last ``body`` tokens if fewer follow;
    and ``offset``. ``(None, offset)`` if the document holds fewer than ``body`` tokens."""
    size = text.doc_bytes[doc]
    jsonl = bool(text.doc_line[doc])
    if jsonl:  # positions count characters of the parsed text, at the drawn fraction of the line
        whole = document_text(text, doc)
        offset, size = offset * len(whole) // text.doc_bytes[doc], len(whole)

    def tokens_of(begin: int, want: int) -> tuple[list[int], int, int]:
        """The tokens of the slice ``[begin, begin + want)`` and the range of them that are whole: a slice begun
        or ended inside a word has half of one at that edge."""
        chunk = whole[begin : begin + want] if jsonl else document_text(text, doc, begin, want)
        cut_start, cut_end = begin > 0, begin + want < size
        chunk, head, tail = _word_edges(chunk, cut_start, cut_end)
        tokens = tokenize_text(tokenizer, chunk)
        # Without whitespace to cut at, drop the edge token instead: likely the half of a word.
        return tokens, int(cut_start and not head), len(tokens) - int(cut_end and not tail)

    want = SLICE_BYTES_PER_TOKEN * (body + 2)
    while offset + want < size:  # the slice from the drawn byte on, grown until it holds a window
        tokens, first, last = tokens_of(offset, want)
        if last - first >= body:
            return tokens[first : first + body], offset
        want *= 2
    tokens, first, last = tokens_of(offset, size - offset)  # the rest of the document, if it holds a window
    if last - first >= body:
        return tokens[first : first + body], offset
    while True:  # else the window ends at the document's end: its last tokens
        begin = max(0, size - want)
        tokens, first, last = tokens_of(begin, size - begin)
        if last - first >= body:
            return tokens[last - body : last], offset
        if begin == 0:
            return None, offset  # the whole document is shorter than a window
        want *= 2
