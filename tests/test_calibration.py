"""Self-calibration on the user's own text (``--calibration PATH``): what is read and how it is indexed, the
encodings, the refusals (one line, exit 2, before any weights load, nothing written), the windows (checked against
each document read and tokenized here with plain Python), how they spread over a large text and how little of it
is read for them, the kept neurons against a hand computation on every path, and the manifest's record of the
files."""

from __future__ import annotations

import bisect
import codecs
import collections
import errno
import functools
import hashlib
import json
import os
import re
import socket
from pathlib import Path

import pytest
import torch
import transformers
from running import compress_quietly, run_cli
from tiny_models import WIDTH, all_tensors, save_sharded, tiny_model, tiny_text, tiny_tokenizer
from untouched import refused

import prunenet
import prunenet.calibration as calibration
from prunenet.adapters import get_adapter
from prunenet.calibration import CalibrationError, calibration_windows, read_calibration
from prunenet.checkpoint import read_manifest
from prunenet.config import PruneConfig, kept_width
from prunenet.memory_plan import plan_forward
from prunenet.perplexity import document_prefix
from prunenet.selectors import selector_of
from prunenet.streaming import CheckpointSource
from prunenet.text import load_text

RATIO = 0.25
K = kept_width(RATIO, WIDTH)
CONTEXT = 64  # the tiny models' max_position_embeddings: --probe-length 128 is capped to it
run = functools.partial(compress_quietly, ratio=RATIO, method="selfcal", seed=4)


class Link:
    """A symbolic link to ``target`` (relative to the link's folder), for :func:`write_texts`."""

    def __init__(self, target: str):
        self.target = target


def write_texts(folder, documents: dict) -> None:
    """Each ``relative path: content`` written under ``folder`` (str as UTF-8, bytes as they are, a :class:`Link`
    as a symbolic link)."""
    for name, content in documents.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Link):
            path.symlink_to(content.target)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.fixture
def text_dir(tmp_path):
    """A folder of the tiny vocabulary's text: two plain files and a .jsonl of two documents."""
    folder = tmp_path / "text"
    lines = [json.dumps({"text": tiny_text(150, seed=s), "id": s}) for s in (3, 4)]
    write_texts(folder, {"a.txt": tiny_text(300, seed=1), "notes/b.md": tiny_text(90, seed=2),
                         "c.jsonl": "\n".join(lines) + "\n"})  # fmt: skip
    return folder


def bos_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The tiny tokenizer with a BOS before every document, as Gemma's and Llama's tokenizers encode one."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


# -- the reference: a document read and tokenized here, not by prunenet.calibration --------------------------


def read_document(file: str, line: int | None) -> tuple[str, str | None]:
    """The text of the document a window names, read with plain Python, and the encoding family its byte offsets
    count in (``None`` for a ``.jsonl`` document, whose offsets count characters of its text)."""
    data = Path(file).read_bytes()
    if line is not None:
        return json.loads(data.decode("utf-8-sig").split("\n")[line - 1])["text"], None
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: UTF-32-LE's mark begins so
        return data.decode("utf-32"), "utf-32"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16"), "utf-16"
    return data.decode("utf-8-sig"), "utf-8"


def char_at(text: str, family: str | None, offset: int) -> int:
    """The first character of ``text`` that begins at or after ``offset`` (a byte offset in ``family``, after the
    byte-order mark; a character offset for ``None``)."""
    if family is None:
        return offset
    codec = {"utf-8": "utf-8", "utf-16": "utf-16-le", "utf-32": "utf-32-le"}[family]
    starts, at = [], 0
    for ch in text:
        starts.append(at)
        at += len(ch.encode(codec))
    return bisect.bisect_left(starts, offset)


def text_tokens(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """``text``'s ids as the model reads a document's text (no special tokens added, none read from the text) and
    the character each begins at."""
    encoding = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    return encoding["input_ids"], [start for start, _ in encoding["offset_mapping"]]


def check_window(tokenizer, ids: list[int], window: dict) -> int:
    """That ``ids`` are consecutive tokens of the document ``window`` names, where its ``offset`` says: beginning
    with the first token of the first word that starts after it (the whitespace before that word, from the text
    itself; the token after it where there is no whitespace to cut at), or, where fewer tokens than a window follow
    it, the document's last ``len(ids)`` tokens. Returns the index of the window's first token in the document."""
    text, family = read_document(window["file"], window["line"])
    tokens, starts = text_tokens(tokenizer, text)
    width = len(ids)
    found = [i for i in range(len(tokens) - width + 1) if tokens[i] == ids[0] and tokens[i : i + width] == ids]
    assert found, f"{window}: not consecutive tokens of its document"
    position = char_at(text, family, window["offset"])
    if position > 0:  # a window from inside the document begins at a word's start
        position = next((i for i in range(position, len(text) - 1) if text[i].isspace() and not text[i + 1].isspace()),
                        position)  # fmt: skip
    first = bisect.bisect_left(starts, position)  # the first token at or after it
    at = [i for i in found if first <= i <= first + 1]
    at += [i for i in found if i == len(tokens) - width and len(tokens) - first <= width]
    assert at, f"{window}: its tokens are at {found}, not at its offset (token {first} of {len(tokens)})"
    return at[0]


# -- reading -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [7, None], ids=["7-byte-chunks", "1MiB-chunks"])
def test_a_folder_is_indexed_into_its_txt_md_and_jsonl_documents_in_path_order(chunk, tmp_path, monkeypatch):
    if chunk is not None:  # every line and character then straddles a chunk's edge somewhere
        monkeypatch.setattr(calibration, "CHUNK_BYTES", chunk)
    folder = tmp_path / "corpus"
    jsonl = '{"text": "w7 \\n w7b"}\n\n{"text": "w8 w9", "n": 2}\r\n{"n": 3, "text": "w10"}'  # no final line break
    write_texts(folder, {
        "b.md": "w5 w6\n", "a.txt": "\ufeffw3 caf\u00e9 w4", "sub/c.jsonl": jsonl,
        "x.bin": "w10", "README": "w11", ".hidden/d.txt": "w12", ".e.txt": "w13", "sub/.cache/f.md": "w14",
    })  # fmt: skip
    (folder / "weights.bin").write_bytes(b"\0\1\2")
    text = read_calibration([str(folder)])
    files = [folder / "a.txt", folder / "b.md", folder / "sub" / "c.jsonl"]
    assert [f.path for f in text.files] == [str(p) for p in files]
    assert (list(text.doc_file), list(text.doc_line)) == ([0, 1, 2, 2, 2], [0, 0, 1, 3, 4])
    assert text.documents == 5 and [f.documents for f in text.files] == [1, 1, 3]
    # Each document's bytes, located in its file: the whole text after the byte-order mark, or its line.
    located = [
        files[f].read_bytes()[o : o + n] for f, o, n in zip(text.doc_file, text.doc_offset, text.doc_bytes, strict=True)
    ]
    lines = jsonl.encode().split(b"\n")
    assert located == ["w3 caf\u00e9 w4".encode(), b"w5 w6\n", lines[0], lines[2], lines[3]]
    for f, path in zip(text.files, files, strict=True):
        data = path.read_bytes()
        assert (f.bytes, f.sha256, f.encoding) == (len(data), hashlib.sha256(data).hexdigest(), "utf-8")
    # A file named directly is read whatever its name; one reached twice is read once, where first reached.
    again = read_calibration([folder / "README", folder, str(folder / "a.txt")])
    assert [os.path.basename(f.path) for f in again.files] == ["README", "a.txt", "b.md", "c.jsonl"]
    assert again.documents == 6


def test_calibration_is_a_tuple_of_paths_in_the_config(tmp_path):
    assert PruneConfig(ratio=0.1, method="selfcal", calibration="a.txt").calibration == ("a.txt",)
    assert PruneConfig(ratio=0.1, method="selfcal", calibration=[tmp_path, "b"]).calibration == (str(tmp_path), "b")
    assert PruneConfig(ratio=0.1, method="selfcal").calibration is None
    with pytest.raises(ValueError, match="--calibration takes one or more paths"):
        PruneConfig(ratio=0.1, method="selfcal", calibration=[]).validate()
    with pytest.raises(ValueError, match="--calibration takes one or more paths"):
        PruneConfig(ratio=0.1, method="selfcal", calibration=3).validate()
    with pytest.raises(ValueError, match="--calibration applies only to --method selfcal"):
        selector_of(PruneConfig(ratio=0.1, method="magnitude", calibration="a.txt"))


def test_empty_documents_are_skipped_and_counted(tmp_path):
    write_texts(tmp_path, {
        "a.jsonl": '{"text": ""}\n{"text": "w3 w4"}\n{"text": " \\n\\t "}\n\n{"text": "w5"}\n',
        "b.txt": " \n\t\n", "c.md": "w6 w7",
    })  # fmt: skip
    text = read_calibration([tmp_path])
    assert (list(text.doc_file), list(text.doc_line)) == ([0, 0, 2], [2, 5, 0])
    record = text.record()
    assert [(f["documents"], f["empty_documents_skipped"]) for f in record["files"]] == [(2, 2), (0, 1), (1, 0)]
    assert (record["documents"], record["empty_documents_skipped"]) == (3, 3)
    # eval/finetune --text-file: the documents' texts, one per paragraph, the empty ones left out.
    assert load_text(tmp_path / "a.jsonl") == "w3 w4\n\nw5"
    with pytest.raises(CalibrationError, match="holds no text: it is empty, or only whitespace"):
        read_calibration([tmp_path / "b.txt"])
    write_texts(tmp_path, {"d/e.jsonl": '{"text": ""}\n{"text": "  "}\n', "d/f.md": "\n"})
    with pytest.raises(CalibrationError, match="d/e.jsonl, .*d/f.md holds no text: it is empty, or only whitespace"):
        read_calibration([tmp_path / "d"])


# A text of several encodings' characters (a word of the tiny vocabulary between them, so that windows are
# recognisable): 2-, 3- and 4-byte UTF-8, a UTF-16 surrogate pair.
NON_ASCII = ("caf\u00e9", "\u65e5\u672c", "\U0001f600")
ENCODED = " ".join(f"{word} {NON_ASCII[i % 3]}" if i % 4 == 0 else word
                   for i, word in enumerate(tiny_text(600, seed=7).split()))  # fmt: skip
ENCODINGS = {
    "utf-8": b"", "utf-8-bom": codecs.BOM_UTF8, "utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE,
    "utf-32-le": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE,
}  # fmt: skip


@pytest.mark.parametrize("chunk", [7, None], ids=["7-byte-chunks", "1MiB-chunks"])
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_utf16_and_utf32_with_a_byte_order_mark_are_read_as_the_same_text(encoding, chunk, tmp_path, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(calibration, "CHUNK_BYTES", chunk)
    codec = encoding.removesuffix("-bom")
    bom = ENCODINGS[encoding]
    path = tmp_path / "text.txt"
    path.write_bytes(bom + ENCODED.encode(codec))
    text = read_calibration([path])
    assert (text.files[0].encoding, text.files[0].start) == (codec, len(bom))
    assert (text.documents, text.doc_offset[0], text.doc_bytes[0]) == (1, len(bom), len(ENCODED.encode(codec)))
    assert load_text(path) == ENCODED
    tokenizer = tiny_tokenizer()
    windows = calibration_windows(text, tokenizer, sequences=40, length=24, seed=1)
    starts = [check_window(tokenizer, row, w) for row, w in zip(windows.ids.tolist(), windows.record["windows"],
                                                                 strict=True)]  # fmt: skip
    assert len(set(starts)) > 30  # drawn all over the text, not one window again and again


# -- refusals ------------------------------------------------------------------------------------------------

BAD_TEXTS = {
    # name: (files to write, the path to pass (relative to the inputs), a fragment of the error line)
    "missing": ({}, "nothing.txt", "nothing.txt does not exist"),
    "no-text-files": ({"folder/model.bin": "w3 w4"}, "folder", "holds no .txt, .md or .jsonl files"),
    "nul-bytes": ({"bin.txt": "w3\0w4"}, "bin.txt", "bin.txt is a binary file (it holds NUL bytes)"),
    "utf16-without-bom": ({"u.txt": "w3 w4".encode("utf-16-le")}, "u.txt", "u.txt is a binary file (it holds NUL"),
    "not-utf8": ({"latin1.txt": b"w3 caf\xe9 w4"}, "latin1.txt", "latin1.txt is not UTF-8 text (byte 6:"),
    "whitespace": ({"blank.md": " \n\t\n"}, "blank.md", "blank.md holds no text: it is empty, or only whitespace"),
    "empty-folder-file": ({"d/empty.txt": ""}, "d", "empty.txt holds no text: it is empty, or only whitespace"),
    "broken-link": ({"d/a.txt": "w3", "d/gone.txt": Link("nowhere.txt")}, "d", "gone.txt is a broken symbolic link"),
    "jsonl-not-json": ({"bad.jsonl": '{"text": "w3"}\n{"text": w4}\n'}, "bad.jsonl", "bad.jsonl line 2 is not JSON"),
    "jsonl-no-text": ({"c.jsonl": '{"content": "w3"}\n'}, "c.jsonl", 'c.jsonl line 1 has no string "text" field'),
    "jsonl-text-not-str": ({"c.jsonl": '{"text": 3}\n'}, "c.jsonl", 'c.jsonl line 1 has no string "text" field'),
    "jsonl-empty-texts": ({"c.jsonl": '{"text": ""}\n{"text": "  "}\n'}, "c.jsonl", "c.jsonl holds no text: it is"),
    "jsonl-utf16": ({"u.jsonl": codecs.BOM_UTF16_LE + '{"text": "w3"}\n'.encode("utf-16-le")}, "u.jsonl",
                    "u.jsonl is UTF-16-LE JSON Lines; JSON is UTF-8"),
    "unreadable": ({"secret.txt": "w3 w4"}, "secret.txt", "secret.txt cannot be read: permission denied"),
    "too-short": ({"short.txt": tiny_text(40)}, "short.txt", "the --calibration text is too short: 0 of 8 windows of "
                  f"{CONTEXT} tokens of one document each (--probe-length {CONTEXT}) could be drawn from its 1 "
                  "document(s)"),
}  # fmt: skip


def bad_text(case: str, tmp_path, monkeypatch) -> Path:
    """The inputs of ``BAD_TEXTS[case]`` written under ``tmp_path``; returns the path to pass."""
    files, given, _ = BAD_TEXTS[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_texts(inputs, files)
    if case == "unreadable":
        (inputs / given).chmod(0)
        if os.access(inputs / given, os.R_OK):  # root reads anything: let the read fail as it would for a user
            real_open = open

            def denied(file, *args, **kwargs):
                if os.fspath(file) == str(inputs / given):
                    raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
                return real_open(file, *args, **kwargs)

            monkeypatch.setattr(calibration, "open", denied, raising=False)
    return inputs / given


@pytest.fixture
def no_weights(monkeypatch):
    """Loading weights, in memory or streamed, fails the test: a refusal must come before it."""

    def loaded(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr("prunenet.sources.SourcePlan.open", loaded)
    monkeypatch.setattr("prunenet.models.load_model", loaded)
    monkeypatch.setattr("prunenet.sources.CheckpointStream.run_model", loaded)


@pytest.mark.parametrize("case", sorted(BAD_TEXTS))
def test_unusable_text_is_refused_in_one_line_before_any_weights_load(case, tiny_dir, tmp_path, capsys, monkeypatch,
                                                                      no_weights):  # fmt: skip
    given = bad_text(case, tmp_path, monkeypatch)
    argv = ["compress", "--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--ratio", "0.25", "--quiet",
            "--method", "selfcal", "--calibration", str(given)]  # fmt: skip
    line = refused(argv, capsys, tmp_path)
    assert BAD_TEXTS[case][2] in line and "--calibration" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
@pytest.mark.parametrize("case", ["missing", "nul-bytes", "jsonl-not-json", "too-short"])
def test_compress_refuses_before_the_weights_load_on_either_path(case, streaming, tiny_dir, tmp_path, monkeypatch,
                                                                 no_weights):  # fmt: skip
    given = bad_text(case, tmp_path, monkeypatch)
    memory = {"max_memory": "1GiB"} if streaming else {}
    with pytest.raises(CalibrationError, match=re.escape(BAD_TEXTS[case][2])):
        run(tiny_dir, tmp_path / "out", calibration=str(given), streaming=streaming, **memory)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    (b"w3 w4 w5 w6 w7 w8\0w9", "is a binary file (it holds NUL bytes)"),
    (b"w3 w4 w5 w6 w7 w8 w9 \xff w10", "is not UTF-8 text (byte 21: invalid start byte)"),
    (b"w3 w4 w5 w6 w7 \xe6\x97", "is not UTF-8 text (it ends inside a character)"),
    (codecs.BOM_UTF16_LE + "w3 w4 w5 w6".encode("utf-16-le") + b"\0", "is not UTF-16-LE text (it ends inside a"),
    (b'{"text": "w3 w4"}\n{"text": "w5 w6"}\n{"text": w7}\n', "line 3 is not JSON"),
    (b"w3 w4 \xe6\x97w5 w6 w7", "is not UTF-8 text (byte 6: invalid continuation byte)"),  # begun a chunk before
], ids=["nul", "not-utf8", "cut-utf8", "cut-utf16", "jsonl-line", "straddling"])  # fmt: skip
def test_a_fault_past_the_first_chunk_is_found(content, message, tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "CHUNK_BYTES", 7)
    path = tmp_path / ("text.jsonl" if content.startswith(b"{") else "text.txt")
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match=re.escape(f"--calibration {path} {message}")):
        read_calibration([path])


def test_the_cli_refusal_is_one_line_in_a_subprocess(tiny_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(tiny_text(40))
    proc = run_cli("compress", "--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--ratio", "0.25", "--quiet",
                   "--method", "selfcal", "--calibration", str(short), check=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "prunenet compress: error: the --calibration text is too short: 0 of 8 windows of 64 tokens of one document "
        "each (--probe-length 64) could be drawn from its 1 document(s); give more text, or lower --probe-length or "
        "--probe-sequences"
    ]  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_ratio_that_keeps_every_neuron_still_reads_and_records_the_text(tiny_dir, text_dir, tmp_path, monkeypatch):
    run(tiny_dir, tmp_path / "out", ratio=0.0, calibration=str(text_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    windows = calibration_windows(read_calibration([text_dir]), tokenizer, PruneConfig.probe_sequences, CONTEXT, 4)
    assert read_manifest(tmp_path / "out")["calibration"] == windows.record
    short = tmp_path / "short.txt"
    short.write_text(tiny_text(40))
    with pytest.raises(CalibrationError, match="the --calibration text is too short"):
        run(tiny_dir, tmp_path / "out0", ratio=0.0, calibration=str(short))
    assert not (tmp_path / "out0").exists()


def test_calibration_with_another_method_is_refused(tiny_dir, text_dir, tmp_path, capsys):
    for method in ("random", "prunenet"):
        argv = ["compress", "--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--ratio", "0.25",
                "--method", method, "--calibration", str(text_dir)]  # fmt: skip
        assert "--calibration applies only to --method selfcal" in refused(argv, capsys, tmp_path)
    with pytest.raises(ValueError, match="--calibration applies only to --method selfcal"):
        prunenet.prune_(tiny_model("llama"), RATIO, method="random", calibration=str(text_dir))


def test_prune_needs_the_tokenizer_for_calibration(text_dir):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="calibration= needs the model's tokenizer"):
        prunenet.prune_(model, RATIO, method="selfcal", calibration=str(text_dir))
    assert get_adapter(model.config).ffn_width(model.config) == WIDTH  # untouched


# -- symbolic links ------------------------------------------------------------------------------------------


def test_symbolic_links_to_folders_are_followed_once_each(tmp_path):
    corpus = tmp_path / "corpus"
    write_texts(tmp_path, {"elsewhere/b.md": "w5 w6", "corpus/a.txt": "w3 w4", "corpus/sub/c.md": "w7 w8",
                           "corpus/linked": Link("../elsewhere"), "corpus/sub/loop": Link(".."),
                           "corpus/z.txt": Link("a.txt")})  # fmt: skip
    text = read_calibration([corpus])
    # The linked folder's file under the link's path; the loop back to the corpus ends; a.txt once.
    assert [f.path for f in text.files] == [str(corpus / "a.txt"), str(corpus / "linked" / "b.md"),
                                            str(corpus / "sub" / "c.md")]  # fmt: skip
    assert text.documents == 3 and text.files[1].sha256 == hashlib.sha256(b"w5 w6").hexdigest()


# -- windows -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer, prefix", [(tiny_tokenizer, []), (bos_tokenizer, [1])], ids=["none", "bos"])
def test_windows_are_seeded_runs_of_one_document_after_the_document_prefix(tokenizer, prefix, text_dir):
    tokenizer = tokenizer()
    assert document_prefix(tokenizer) == prefix
    text = read_calibration([text_dir])
    first = calibration_windows(text, tokenizer, sequences=40, length=40, seed=3)
    again = calibration_windows(read_calibration([text_dir]), tokenizer, sequences=40, length=40, seed=3)
    other = calibration_windows(text, tokenizer, sequences=40, length=40, seed=4)
    assert torch.equal(first.ids, again.ids) and first.record == again.record
    assert not torch.equal(first.ids, other.ids)
    assert first.ids.shape == (40, 40) and first.ids.dtype == torch.int64
    for row, window in zip(first.ids.tolist(), first.record["windows"], strict=True):
        assert row[: len(prefix)] == prefix and set(window) == {"file", "line", "offset"}
        check_window(tokenizer, row[len(prefix) :], window)
    # Every document is drawn from (the 90-word one, 1 in 9 of the text, too), each named by file and line.
    assert {(os.path.relpath(w["file"], text_dir), w["line"]) for w in first.record["windows"]} == {
        ("a.txt", None), ("c.jsonl", 1), ("c.jsonl", 2), (os.path.join("notes", "b.md"), None)}  # fmt: skip
    record = first.record
    assert (record["documents"], record["empty_documents_skipped"]) == (4, 0)
    assert (record["window_tokens"], record["prefix_tokens"], record["tokens"]) == (40, len(prefix), 40 * 40)


def test_a_window_needs_one_document_of_as_many_tokens(tmp_path):
    body = 39  # --probe-length 40 after the BOS
    words = tiny_text(2 * body, seed=3).split()
    write_texts(tmp_path, {"short.txt": " ".join(words[: body - 1]), "exact.txt": " ".join(words[body:])})
    tokenizer = bos_tokenizer()
    windows = calibration_windows(read_calibration([tmp_path]), tokenizer, sequences=5, length=body + 1, seed=0)
    exact = [1, *tokenize_words(words[body:])]
    assert windows.ids.tolist() == [exact] * 5  # never the shorter document, never a token past a document
    assert {os.path.basename(w["file"]) for w in windows.record["windows"]} == {"exact.txt"}
    with pytest.raises(CalibrationError) as refusal:
        calibration_windows(read_calibration([tmp_path / "short.txt"]), tokenizer, sequences=3, length=body + 1,
                            seed=0)  # fmt: skip
    assert str(refusal.value) == (
        "the --calibration text is too short: 0 of 3 windows of 39 tokens of one document each (--probe-length 40 "
        "after the tokenizer's 1-token document prefix) could be drawn from its 1 document(s); give more text, or "
        "lower --probe-length or --probe-sequences"
    )  # fmt: skip


def tokenize_words(words: list[str]) -> list[int]:
    """The tiny tokenizer's ids of its words ``wN``: ``N``."""
    return [int(word[1:]) for word in words]


def test_special_token_strings_in_the_text_are_text(tmp_path):
    tokenizer = bos_tokenizer()
    words = tiny_text(500, seed=5).split()
    text = " ".join(f"{w} <s>" if i % 7 == 0 else f"{w}</s>" if i % 7 == 3 else w for i, w in enumerate(words))
    (tmp_path / "a.txt").write_text(text)
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert special <= set(tokenizer(text, add_special_tokens=False)["input_ids"])  # read as control tokens so
    windows = calibration_windows(read_calibration([tmp_path]), tokenizer, sequences=30, length=24, seed=2)
    for row, window in zip(windows.ids.tolist(), windows.record["windows"], strict=True):
        assert row[0] == tokenizer.bos_token_id and not special & set(row[1:])
        check_window(tokenizer, row[1:], window)


def test_documents_are_drawn_in_proportion_to_their_usable_length(tmp_path):
    write_texts(tmp_path, {"long.txt": tiny_text(1000, seed=1), "short.txt": tiny_text(60, seed=2)})
    text = read_calibration([tmp_path])
    windows = calibration_windows(text, tiny_tokenizer(), sequences=1000, length=21, seed=0).record["windows"]
    short = sum(w["file"].endswith("short.txt") for w in windows)
    # 1 byte of 17.7 is the short document's: about 57 of 1000 windows (sd 7).
    assert 25 <= short <= 90


# -- a large text: spread over all of it, read a little ------------------------------------------------------

NUMBERED = 500_000
"""Words in the numbered corpora: more than 1000 windows of 16 tokens times 16 (a pool of text drawn from only
its beginning would then cover half of it)."""


def number(i: int) -> str:
    """Word ``i`` of the numbered corpora: 7 characters, so that with its space word ``i`` of a document of
    consecutive words from ``j`` begins at byte ``8 (i - j)``."""
    return f"n{i:06d}"


@pytest.fixture(scope="module")
def numbered_tokenizer():
    """A word-level tokenizer whose word ``number(i)`` is id ``i + 3``: a window's ids say where in the text it is."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{number(i): i + 3 for i in range(NUMBERED)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")  # fmt: skip


@pytest.fixture(scope="module")
def numbered(tmp_path_factory) -> dict[str, tuple[Path, list[int], int]]:
    """The words ``number(0)`` ... in order, as one 4 MB file and as a folder of 2000 files of 25 to 475 words
    (increasing: a draw by file rather than by size would crowd the first tenth); each with the first word of
    its files and the number of words."""
    root = tmp_path_factory.mktemp("numbered")
    (root / "one.txt").write_text(" ".join(number(i) for i in range(NUMBERED)))
    folder, firsts, at = root / "many", [], 0
    folder.mkdir()
    for i in range(2000):
        size = 25 + 450 * i // 1999
        (folder / f"doc{i:04d}.txt").write_text(" ".join(number(j) for j in range(at, at + size)))
        firsts.append(at)
        at += size
    return {"one-file": (root / "one.txt", [0], NUMBERED), "many-files": (folder, firsts, at)}


@pytest.mark.parametrize("corpus", ["one-file", "many-files"])
def test_windows_spread_over_the_whole_text(corpus, numbered, numbered_tokenizer):
    path, firsts, total = numbered[corpus]
    text = read_calibration([path])
    width = 16
    windows = calibration_windows(text, numbered_tokenizer, sequences=1000, length=width, seed=0)
    names = [f.path for f in text.files]
    tenths = collections.Counter()
    for row, window in zip(windows.ids.tolist(), windows.record["windows"], strict=True):
        first = row[0] - 3
        assert row == list(range(row[0], row[0] + width))  # consecutive words
        doc = names.index(window["file"])
        begins, ends = firsts[doc], firsts[doc + 1] if doc + 1 < len(firsts) else total
        assert begins <= first and first + width <= ends  # of the document the record names
        at, after = first - begins, -(-window["offset"] // 8)  # the word at or after the recorded offset
        assert after <= at <= after + 1 or (at == ends - begins - width and ends - begins - after <= width)
        tenths[first * 10 // total] += 1
    # 100 windows a tenth, sd 9.5.
    assert all(50 <= tenths[i] <= 150 for i in range(10)), sorted(tenths.items())


def test_a_large_text_is_read_and_tokenized_a_slice_a_window(numbered, numbered_tokenizer, monkeypatch):
    path, _, _ = numbered["one-file"]
    text = read_calibration([path])
    width, sequences = 16, 50
    tokenized, read = [], []
    tokenize = transformers.PreTrainedTokenizerFast.__call__

    def counted_tokenize(self, text, *args, **kwargs):
        tokenized.append(len(text) if isinstance(text, str) else sum(map(len, text)))
        return tokenize(self, text, *args, **kwargs)

    class Counted:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def read(self, *args):
            data = self.file.read(*args)
            read.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "__call__", counted_tokenize)
    monkeypatch.setattr(calibration, "open", lambda *args, **kwargs: Counted(open(*args, **kwargs)), raising=False)
    windows = calibration_windows(text, numbered_tokenizer, sequences=sequences, length=width, seed=0)
    assert windows.ids.shape == (sequences, width) and tokenized and read
    bound = 64 * width * 16  # characters (bytes) of the 4 MB document
    assert max(tokenized) <= bound and sum(read) <= sequences * bound, (max(tokenized), sum(read))


# -- the kept neurons ----------------------------------------------------------------------------------------


def reference_keeps(model, ids: torch.Tensor, k: int) -> list[list[int]]:
    """By hand: the dense model on ``ids`` ``(B, T)``, a pre-hook on each down_proj summing ``h^2`` in float64, the
    score ``sqrt(mean h^2) * ||W_down[:, j]||``, the top ``k`` (lowest index on ties)."""
    layers = model.model.layers
    sums = [torch.zeros(WIDTH, dtype=torch.float64) for _ in layers]
    counts = [0] * len(layers)

    def hook(i):
        def read(module, args):
            h = args[0].detach().reshape(-1, WIDTH).double()
            sums[i] += (h * h).sum(0)
            counts[i] += h.shape[0]

        return read

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    keeps = []
    for i, layer in enumerate(layers):
        score = (sums[i] / counts[i]).sqrt() * layer.mlp.down_proj.weight.detach().double().norm(dim=0)
        keeps.append(sorted(torch.sort(-score, stable=True).indices[:k].tolist()))
    return keeps


def test_the_kept_neurons_equal_a_hand_computation_on_the_same_windows(tiny_dir, text_dir, tmp_path):
    result = run(tiny_dir, tmp_path / "out", calibration=str(text_dir), streaming=False)
    manifest = read_manifest(tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    windows = calibration_windows(read_calibration([text_dir]), tokenizer, PruneConfig.probe_sequences, CONTEXT, 4)
    assert manifest["calibration"] == windows.record  # the windows compress ran on: the seed's, at the context
    for row, window in zip(windows.ids.tolist(), windows.record["windows"], strict=True):
        check_window(tokenizer, row, window)
    dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    assert manifest["kept_indices"] == reference_keeps(dense, windows.ids, K)
    assert "calibration_s" in result.timings and "probe_s" not in result.timings and "stats_s" in result.timings


def test_prune_on_a_callers_model_keeps_what_compress_keeps(tiny_dir, text_dir, tmp_path):
    run(tiny_dir, tmp_path / "out", calibration=[str(text_dir)], streaming=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    result = prunenet.prune_(model, RATIO, method="selfcal", seed=4, calibration=text_dir, tokenizer=tokenizer)
    assert [keep.tolist() for keep in result.keeps] == read_manifest(tmp_path / "out")["kept_indices"]
    assert result.manifest()["calibration"]["windows"] == read_manifest(tmp_path / "out")["calibration"]["windows"]


def offloading_budget(source) -> int:
    """A --max-memory under which a stream runs selfcal with its blocks read from the checkpoint as each runs."""
    config = transformers.AutoConfig.from_pretrained(source)
    plan = plan_forward(CheckpointSource(source), get_adapter(config), config, 2**40, "cpu", 8, 128)
    return plan.resident_bytes + plan.kv_bytes + plan.activation_bytes + plan.block_bytes + 1


def test_streaming_keeps_the_same_neurons_as_in_memory(text_dir, tmp_path, one_thread):
    source = tmp_path / "src"
    save_sharded("llama", source)
    # The budget holds the selection pass with one block; compensation's H would need more (its streaming is
    # tests/test_compensation.py's).
    run(source, tmp_path / "mem", calibration=str(text_dir), streaming=False, compensate=False)
    run(source, tmp_path / "stream", calibration=str(text_dir), streaming=True, max_memory=offloading_budget(source),
        compensate=False)  # fmt: skip
    mem, stream = read_manifest(tmp_path / "mem"), read_manifest(tmp_path / "stream")
    assert stream["memory_plan"]["blocks"] == "disk" and stream["streaming"] and not mem["streaming"]
    assert stream["kept_indices"] == mem["kept_indices"] and stream["calibration"] == mem["calibration"]
    a, b = all_tensors(tmp_path / "mem"), all_tensors(tmp_path / "stream")
    assert all(torch.equal(tensor, b[name]) for name, tensor in a.items())


@pytest.mark.slow
def test_torchrun_keeps_the_same_neurons_as_one_process(text_dir, tmp_path):
    source = tmp_path / "src"
    save_sharded("llama", source)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    proc = run_cli("compress", "--model", str(source), "--out", str(tmp_path / "two"), "--ratio", str(RATIO),
                   "--method", "selfcal", "--seed", "4", "--calibration", str(text_dir), "--device", "cpu", "--quiet",
                   launcher=torchrun, check=False, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    run(source, tmp_path / "one", calibration=str(text_dir), streaming=True)
    one, two = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert two["kept_indices"] == one["kept_indices"] and two["calibration"] == one["calibration"]


# -- the manifest --------------------------------------------------------------------------------------------


def test_the_manifest_records_each_file_as_given_with_its_size_and_sha256(tiny_dir, text_dir, tmp_path, monkeypatch):
    (tmp_path / "extra.txt").write_text(tiny_text(120, seed=9))
    monkeypatch.chdir(tmp_path)
    run(tiny_dir, tmp_path / "out", calibration=["text", "extra.txt"])
    manifest = read_manifest(tmp_path / "out")
    assert manifest["method_options"]["calibration"] == ["text", "extra.txt"]  # a JSON list, as given
    record = manifest["calibration"]
    expected = [os.path.join("text", "a.txt"), os.path.join("text", "c.jsonl"), os.path.join("text", "notes", "b.md"),
                "extra.txt"]  # fmt: skip
    assert [f["path"] for f in record["files"]] == expected
    for entry, path in zip(record["files"], expected, strict=True):
        data = (tmp_path / path).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["encoding"] == "utf-8" and entry["empty_documents_skipped"] == 0
    assert [f["documents"] for f in record["files"]] == [1, 2, 1, 1] and record["documents"] == 5
    assert len(record["windows"]) == PruneConfig.probe_sequences
    assert {w["file"] for w in record["windows"]} <= set(expected)
    assert record["tokens"] == PruneConfig.probe_sequences * CONTEXT and record["window_tokens"] == CONTEXT
    # Where the user keeps their text (their home folder, their user name) is not the manifest's to show.
    assert str(tmp_path) not in json.dumps(record) and os.path.realpath(tmp_path) not in json.dumps(record)


def test_the_summary_names_the_calibration_time(tiny_dir, text_dir, tmp_path):
    proc = run_cli("compress", "--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--ratio", "0.25",
                   "--method", "selfcal", "--calibration", str(text_dir), "--quiet", "--json")  # fmt: skip
    assert "of which reading and tokenizing the calibration text" in proc.stdout
    assert "probe generation" not in proc.stdout
    assert "calibration_s" in json.loads(proc.stdout.strip().splitlines()[-1])


def test_without_calibration_selfcal_records_what_it_always_did(tiny_dir, tmp_path, one_thread):
    run(tiny_dir, tmp_path / "out", probe_sequences=2)
    manifest = read_manifest(tmp_path / "out")
    options = manifest["method_options"]
    assert (options["probe_sequences"], options["probe_length"]) == (2, 128)
    assert "calibration" not in options and "calibration" not in manifest and "probe_s" in manifest["timings_s"]


def test_reading_and_cutting_windows_write_nothing(text_dir):
    before = {p: p.stat().st_mtime_ns for p in text_dir.rglob("*")}
    calibration_windows(read_calibration([text_dir]), tiny_tokenizer(), sequences=4, length=16, seed=0)
    assert {p: p.stat().st_mtime_ns for p in text_dir.rglob("*")} == before


def test_a_text_mostly_of_short_documents_still_gives_its_windows(tmp_path):
    """Many documents longer than a window in bytes but not in tokens, and one long one: the windows come from
    the long one, however many draws land in the short ones first."""
    lines = [json.dumps({"text": " ".join(f"w{i % 40}" for i in range(j, j + 15))}) for j in range(5000)]
    lines.append(json.dumps({"text": tiny_text(2000, seed=9)}))
    (tmp_path / "text.jsonl").write_text("\n".join(lines))
    windows = calibration_windows(read_calibration([tmp_path]), tiny_tokenizer(), sequences=8, length=16, seed=0)
    assert {w["line"] for w in windows.record["windows"]} == {5001}


def test_a_folder_reached_twice_is_named_by_its_first_path_in_sorted_order(tmp_path):
    (tmp_path / "c" / "real").mkdir(parents=True)
    (tmp_path / "c" / "real" / "x.txt").write_text(tiny_text(50))
    for name in ("alias", "zlias"):  # one sorts before the real folder, one after: listing order must not matter
        (tmp_path / "c" / name).symlink_to(tmp_path / "c" / "real", target_is_directory=True)
    text = read_calibration([tmp_path / "c"])
    assert [f.path for f in text.files] == [str(tmp_path / "c" / "alias" / "x.txt")]


@pytest.mark.slow
def test_windows_of_a_subword_tokenizer_are_runs_of_the_documents_tokens(tmp_path):
    """With SmolLM2's byte-level BPE a slice begun inside a word would tokenize into fragments no tokenization of
    the document has: every window must be a run of the whole document's tokens."""
    from prunenet.embedded import ensure_default_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(ensure_default_model())
    words = "understanding international communication extraordinary responsibilities photosynthesis".split()
    text = " ".join(words[(i * 7) % len(words)] for i in range(3000))
    (tmp_path / "a.txt").write_text(text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = calibration_windows(read_calibration([tmp_path]), tokenizer, sequences=100, length=32, seed=0)
    runs = {tuple(ids[i : i + 32]) for i in range(len(ids) - 31)}
    assert all(tuple(row) in runs for row in windows.ids.tolist())
