"""Self-calibration on the user's own text (``--calibration PATH``): what is read, the refusals (one line, exit 2,
before any weights load, nothing written), the windows, the kept neurons against a hand computation on every
path, and the manifest's record of the files."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import socket

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
from prunenet.streaming import CheckpointSource

RATIO = 0.25
K = kept_width(RATIO, WIDTH)
CONTEXT = 64  # the tiny models' max_position_embeddings: --probe-length 128 is capped to it
run = functools.partial(compress_quietly, ratio=RATIO, method="selfcal", seed=4)


def write_texts(folder, documents: dict[str, str]) -> None:
    """Each ``relative path: content`` written under ``folder``."""
    for name, content in documents.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


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


def document_tokens(text, record: dict) -> dict[tuple[str, int | None], list[int]]:
    """Every document's whole tokenization (the tiny tokenizer: word ``wN`` is id ``N``), by (file, line)."""
    files = {f.resolved: f.path for f in text.files}
    assert set(files.values()) == {f["path"] for f in record["files"]}
    return {
        (text.files[d.file].path, d.line): [int(word[1:]) for word in d.text.split()] for d in text.documents
    }  # fmt: skip


# -- reading -------------------------------------------------------------------------------------------------


def test_a_folder_gives_its_txt_md_and_jsonl_documents_in_path_order(tmp_path):
    folder = tmp_path / "corpus"
    write_texts(folder, {
        "b.md": "w5 w6", "a.txt": "w3 w4", "sub/c.jsonl": '{"text": "w7"}\n\n{"text": "w8 w9", "n": 2}\n',
        "x.bin": "w10", "README": "w11", ".hidden/d.txt": "w12", ".e.txt": "w13", "sub/.cache/f.md": "w14",
    })  # fmt: skip
    (folder / "weights.bin").write_bytes(b"\0\1\2")
    text = read_calibration([str(folder)])
    assert [os.path.relpath(f.path, folder) for f in text.files] == ["a.txt", "b.md", os.path.join("sub", "c.jsonl")]
    assert [(d.text, d.file, d.line) for d in text.documents] == [
        ("w3 w4", 0, None), ("w5 w6", 1, None), ("w7", 2, 1), ("w8 w9", 2, 3),
    ]  # fmt: skip
    assert [f.documents for f in text.files] == [1, 1, 2]
    # A file named directly is read whatever its name; one reached twice is read once.
    again = read_calibration([folder / "README", folder, str(folder / "a.txt")])
    assert [os.path.basename(f.path) for f in again.files] == ["README", "a.txt", "b.md", "c.jsonl"]


def test_calibration_is_a_tuple_of_paths_in_the_config(tmp_path):
    assert PruneConfig(ratio=0.1, method="selfcal", calibration="a.txt").calibration == ("a.txt",)
    assert PruneConfig(ratio=0.1, method="selfcal", calibration=[tmp_path, "b"]).calibration == (str(tmp_path), "b")
    assert PruneConfig(ratio=0.1, method="selfcal").calibration is None
    with pytest.raises(ValueError, match="--calibration takes one or more paths"):
        PruneConfig(ratio=0.1, method="selfcal", calibration=[]).validate()
    with pytest.raises(ValueError, match="--calibration takes one or more paths"):
        PruneConfig(ratio=0.1, method="selfcal", calibration=3).validate()
    with pytest.raises(ValueError, match="--calibration applies only to --method selfcal"):
        PruneConfig(ratio=0.1, method="magnitude", calibration="a.txt").validate()


# -- refusals ------------------------------------------------------------------------------------------------

BAD_TEXTS = {
    # name: (files to write, the path to pass (relative to the inputs), a fragment of the error line)
    "missing": ({}, "nothing.txt", "nothing.txt does not exist"),
    "no-text-files": ({"folder/model.bin": "w3 w4"}, "folder", "holds no .txt, .md or .jsonl files"),
    "nul-bytes": ({"bin.txt": "w3\0w4"}, "bin.txt", "bin.txt is a binary file (it holds NUL bytes)"),
    "not-utf8": ({"latin1.txt": b"w3 caf\xe9 w4"}, "latin1.txt", "latin1.txt is not UTF-8 text"),
    "whitespace": ({"blank.md": " \n\t\n"}, "blank.md", "blank.md holds no text (it is empty or only whitespace)"),
    "empty-folder-file": ({"d/empty.txt": ""}, "d", "empty.txt holds no text"),
    "jsonl-not-json": ({"bad.jsonl": '{"text": "w3"}\n{"text": w4}\n'}, "bad.jsonl", "bad.jsonl line 2 is not JSON"),
    "jsonl-no-text": ({"c.jsonl": '{"content": "w3"}\n'}, "c.jsonl", 'c.jsonl line 1 has no string "text" field'),
    "jsonl-text-not-str": ({"c.jsonl": '{"text": 3}\n'}, "c.jsonl", 'c.jsonl line 1 has no string "text" field'),
    "jsonl-empty-text": ({"c.jsonl": '{"text": "w3"}\n{"text": "  "}\n'}, "c.jsonl", 'c.jsonl line 2: its "text" is'),
    "unreadable": ({"secret.txt": "w3 w4"}, "secret.txt", "secret.txt cannot be read: permission denied"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEXTS))
def test_unusable_text_is_refused_in_one_line_before_any_weights_load(case, tiny_dir, tmp_path, capsys,
                                                                      monkeypatch):  # fmt: skip
    files, given, message = BAD_TEXTS[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, content in files.items():
        path = inputs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if case == "unreadable":
        (inputs / given).chmod(0)
        if os.access(inputs / given, os.R_OK):  # root reads anything: let the read fail as it would for a user
            real_open = open

            def denied(file, *args, **kwargs):
                if os.fspath(file) == str(inputs / given):
                    raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
                return real_open(file, *args, **kwargs)

            monkeypatch.setattr(calibration, "open", denied, raising=False)
    monkeypatch.setattr("prunenet.sources.SourcePlan.open", lambda self: pytest.fail("loaded the weights"))
    argv = ["compress", "--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--ratio", "0.25", "--quiet",
            "--method", "selfcal", "--calibration", str(inputs / given)]  # fmt: skip
    line = refused(argv, capsys, tmp_path)
    assert message in line and "--calibration" in line
    assert not (tmp_path / "out").exists()


def test_a_text_shorter_than_one_window_is_refused_saying_both_counts(tiny_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text(tiny_text(40))
    argv = ["compress", "--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--ratio", "0.25", "--quiet",
            "--method", "selfcal", "--calibration", str(short)]  # fmt: skip
    line = refused(argv, capsys, tmp_path)
    assert f"its longest document has 40 tokens, and a window needs {CONTEXT} tokens" in line
    assert not (tmp_path / "out").exists()


def test_calibration_with_another_method_is_refused(tiny_dir, text_dir, tmp_path, capsys):
    for method in ("random", "prunenet"):
        argv = ["compress", "--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--ratio", "0.25",
                "--method", method, "--calibration", str(text_dir)]  # fmt: skip
        assert "--calibration applies only to --method selfcal" in refused(argv, capsys, tmp_path)
    with pytest.raises(ValueError, match="--calibration applies only to --method selfcal"):
        prunenet.prune_(tiny_model("llama"), RATIO, method="random", calibration=str(text_dir))


def test_the_cli_refusal_is_one_line_in_a_subprocess(tiny_dir, tmp_path):
    proc = run_cli("compress", "--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--ratio", "0.25",
                   "--method", "selfcal", "--calibration", str(tmp_path / "nope"), check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"prunenet compress: error: --calibration {tmp_path / 'nope'} does not exist" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_prune_needs_the_tokenizer_for_calibration(text_dir):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="calibration= needs the model's tokenizer"):
        prunenet.prune_(model, RATIO, method="selfcal", calibration=str(text_dir))
    assert get_adapter(model.config).ffn_width(model.config) == WIDTH  # untouched


# -- windows -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer, prefix", [(tiny_tokenizer, []), (bos_tokenizer, [1])], ids=["none", "bos"])
def test_windows_are_seeded_slices_of_one_document_after_the_document_prefix(tokenizer, prefix, text_dir):
    tokenizer = tokenizer()
    assert document_prefix(tokenizer) == prefix
    text = read_calibration([text_dir])
    first = calibration_windows(text, tokenizer, sequences=12, length=40, seed=3)
    again = calibration_windows(text, tokenizer, sequences=12, length=40, seed=3)
    other = calibration_windows(text, tokenizer, sequences=12, length=40, seed=4)
    assert torch.equal(first.ids, again.ids) and first.record == again.record
    assert not torch.equal(first.ids, other.ids)
    assert first.ids.shape == (12, 40) and first.ids.dtype == torch.int64
    documents = document_tokens(text, first.record)
    body = 40 - len(prefix)
    for row, window in zip(first.ids.tolist(), first.record["windows"], strict=True):
        assert row[: len(prefix)] == prefix
        tokens = documents[(window["file"], window["line"])]
        assert row[len(prefix) :] == tokens[window["start"] : window["start"] + body]  # contiguous, in one document
    record = first.record
    assert record["documents"] == 4 and record["window_tokens"] == 40 and record["tokens"] == 12 * 40
    assert record["prefix_tokens"] == len(prefix)


def test_documents_are_drawn_in_proportion_to_their_usable_length(tmp_path):
    write_texts(tmp_path, {"long.txt": tiny_text(1000, seed=1), "short.txt": tiny_text(60, seed=2)})
    text = read_calibration([tmp_path])
    windows = calibration_windows(text, tiny_tokenizer(), sequences=1000, length=21, seed=0).record["windows"]
    short = sum(w["file"].endswith("short.txt") for w in windows)
    # 40 of the 980 + 40 window starts lie in the short document: about 39 of 1000 windows (sd 6).
    assert 15 <= short <= 65


def test_a_large_text_is_not_tokenized_whole(tmp_path):
    write_texts(tmp_path, {f"doc{i:03d}.txt": tiny_text(200, seed=i) for i in range(300)})
    text = read_calibration([tmp_path])
    windows = calibration_windows(text, tiny_tokenizer(), sequences=2, length=16, seed=0)
    # 16 windows' worth per window needed (calibration.POOL_WINDOWS): 2 x 16 x 16 tokens, 3 documents of 200.
    assert windows.record["documents"] == 300 and windows.record["documents_tokenized"] == 3


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


def windows_of(manifest: dict, text_dir) -> torch.Tensor:
    """The ``(B, T)`` ids the manifest says were used, rebuilt from the files themselves."""
    record = manifest["calibration"]
    documents = document_tokens(read_calibration([text_dir]), record)
    body = record["window_tokens"] - record["prefix_tokens"]
    rows = [documents[(w["file"], w["line"])][w["start"] : w["start"] + body] for w in record["windows"]]
    return torch.tensor(rows)


def test_the_kept_neurons_equal_a_hand_computation_on_the_same_windows(tiny_dir, text_dir, tmp_path):
    result = run(tiny_dir, tmp_path / "out", calibration=str(text_dir), streaming=False)
    manifest = read_manifest(tmp_path / "out")
    ids = windows_of(manifest, text_dir)
    assert ids.shape == (PruneConfig.probe_sequences, CONTEXT)
    dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    assert manifest["kept_indices"] == reference_keeps(dense, ids, K)
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


def test_the_manifest_records_each_file_with_its_size_and_sha256(tiny_dir, text_dir, tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text(tiny_text(120, seed=9))
    run(tiny_dir, tmp_path / "out", calibration=[str(text_dir), str(extra)])
    manifest = read_manifest(tmp_path / "out")
    assert manifest["method_options"]["calibration"] == [str(text_dir), str(extra)]  # a JSON list, as given
    record = manifest["calibration"]
    expected = [text_dir / "a.txt", text_dir / "c.jsonl", text_dir / "notes" / "b.md", extra]
    assert [f["path"] for f in record["files"]] == [str(p) for p in expected]
    for entry, path in zip(record["files"], expected, strict=True):
        data = path.read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["resolved"] == str(path.resolve())
    assert [f["documents"] for f in record["files"]] == [1, 2, 1, 1] and record["documents"] == 5
    assert len(record["windows"]) == PruneConfig.probe_sequences
    assert record["tokens"] == PruneConfig.probe_sequences * CONTEXT and record["window_tokens"] == CONTEXT


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


def test_reading_writes_nothing(text_dir):
    before = {p: p.stat().st_mtime_ns for p in text_dir.rglob("*")}
    read_calibration([text_dir])
    assert {p: p.stat().st_mtime_ns for p in text_dir.rglob("*")} == before


def test_a_calibration_error_is_a_value_error():
    assert issubclass(CalibrationError, ValueError)
