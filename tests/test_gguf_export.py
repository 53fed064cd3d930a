"""``prunenet export --format gguf``: pruned models written as GGUF files and run in llama.cpp.

The tensors are checked against the safetensors they came from, read independently with ``gguf``'s reader; the
file's logits in llama.cpp against ``transformers``' on the same token ids. The llama.cpp tests need the ``[gguf]``
extra (``llama-cpp-python``, which builds llama.cpp; ``make test`` installs it) and skip, saying so, without it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections import Counter

import gguf
import numpy as np
import pytest
import torch
from running import compress_quietly, run_cli
from tiny_models import save_tiny_bpe_model, save_tiny_model

from prunenet import gguf_export
from prunenet.checkpoint import read_manifest
from prunenet.gguf_export import ExportError, export_gguf

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP, reason="the [gguf] extra (llama-cpp-python) is not installed: pip install 'prunenet[gguf]'"
)
LOGIT_TOLERANCE = 5e-3
"""Largest |logit difference| between llama.cpp on the F16 file and transformers on the same float16-rounded
weights, relative to the largest |logit| (measured: 1.2e-3 to 1.4e-3 for the four families; llama.cpp rounds
activations to float16 for F16 matrices; with the rotary rows left unordered: 0.89)."""

compress = functools.partial(compress_quietly, ratio=0.3, method="magnitude")


def pruned_bpe_model(tmp_path, family: str):
    """A tiny model of ``family`` with a byte-level BPE tokenizer, pruned at ratio 0.3: its folder."""
    save_tiny_bpe_model(family, tmp_path / "src")
    compress(tmp_path / "src", tmp_path / "out")
    return tmp_path / "out"


def gguf_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32, in PyTorch's dimension order (gguf's reader gives GGML's reversed)."""
    reader = gguf.GGUFReader(path)
    return {
        t.name: np.array(t.data, dtype=np.float32).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors
    }


def field(path, key):
    return gguf.GGUFReader(path).fields[key].contents()


def adjacent_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reference for the RoPE row order of llama.cpp's ``llama`` architecture, by index: within each head of
    ``head_dim`` rows, row ``2i`` is Hugging Face's row ``i`` and row ``2i+1`` its row ``i + head_dim/2``."""
    head_dim = weight.shape[0] // heads
    order = []
    for h in range(heads):
        for i in range(head_dim // 2):
            order += [h * head_dim + i, h * head_dim + head_dim // 2 + i]
    return weight[order]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_is_the_checkpoints_in_float16(tmp_path, family):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = pruned_bpe_model(tmp_path, family)
    result = export_gguf(folder, tmp_path / "m.gguf", progress=False)
    config = AutoConfig.from_pretrained(folder)
    hf = load_file(folder / "model.safetensors")
    written = gguf_tensors(tmp_path / "m.gguf")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[gguf_export.FAMILIES[family].arch], config.num_hidden_layers)
    expected_names = {names.get_name(n, try_suffixes=(".weight", ".bias")) for n in hf}
    assert set(written) == expected_names
    for name, tensor in hf.items():
        if gguf_export.FAMILIES[family].interleave_rope and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            tensor = adjacent_pairs(tensor, heads)
        want = tensor.to(torch.float16 if tensor.dim() > 1 else torch.float32).float().numpy()
        np.testing.assert_array_equal(written[names.get_name(name, try_suffixes=(".weight", ".bias"))], want)
    k = read_manifest(folder)["k"]
    assert result.ffn_width == k == field(tmp_path / "m.gguf", f"{result.arch}.feed_forward_length")
    assert field(tmp_path / "m.gguf", f"{result.arch}.block_count") == config.num_hidden_layers
    assert field(tmp_path / "m.gguf", gguf_export.MARKER_KEY) == gguf_export.__version__


def test_the_vocabulary_and_merges_are_the_tokenizers(tmp_path):
    folder = pruned_bpe_model(tmp_path, "llama")
    export_gguf(folder, tmp_path / "m.gguf", progress=False)
    spec = json.loads((folder / "tokenizer.json").read_text())
    by_id = {i: t for t, i in spec["model"]["vocab"].items()} | {t["id"]: t["content"] for t in spec["added_tokens"]}
    tokens = field(tmp_path / "m.gguf", "tokenizer.ggml.tokens")
    assert tokens == [by_id[i] for i in range(len(tokens))]
    types = field(tmp_path / "m.gguf", "tokenizer.ggml.token_type")
    assert {tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == {"<s>", "</s>", "<|endoftext|>"}
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    assert field(tmp_path / "m.gguf", "tokenizer.ggml.merges") == merges
    assert field(tmp_path / "m.gguf", "tokenizer.ggml.bos_token_id") == by_id_inverse(by_id, "<s>")
    assert field(tmp_path / "m.gguf", "tokenizer.ggml.model") == "gpt2"


def by_id_inverse(by_id: dict[int, str], token: str) -> int:
    return next(i for i, t in by_id.items() if t == token)


def error_of(tmp_path, *args) -> str:
    proc = run_cli("export", *map(str, args), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("prunenet export: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_refusals_are_one_line_and_write_nothing(tmp_path):
    folder = pruned_bpe_model(tmp_path, "llama")
    gemma = tmp_path / "gemma"
    save_tiny_bpe_model("gemma3_text", gemma)
    word_level = tmp_path / "wordlevel"
    save_tiny_model("llama", word_level)
    out = tmp_path / "x.gguf"
    assert "model_type 'gemma3_text' is not exported to GGUF yet" in error_of(tmp_path, "--model", gemma, "--out", out)
    assert "not a byte-level BPE" in error_of(tmp_path, "--model", word_level, "--out", out)
    assert "must name a .gguf file" in error_of(tmp_path, "--model", folder, "--out", tmp_path / "x.bin")
    assert "inside the model folder" in error_of(tmp_path, "--model", folder, "--out", folder / "m.gguf")
    assert "does not exist" in error_of(tmp_path, "--model", folder, "--out", tmp_path / "nope" / "m.gguf")
    foreign = tmp_path / "theirs.gguf"
    foreign.write_bytes(b"not ours")
    assert "exists; pass --overwrite" in error_of(tmp_path, "--model", folder, "--out", foreign)
    assert "not written by prunenet export" in error_of(tmp_path, "--model", folder, "--out", foreign, "--overwrite")
    assert foreign.read_bytes() == b"not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma", "out", "src", "theirs.gguf", "wordlevel"]


def test_overwrite_replaces_only_an_earlier_export(tmp_path):
    folder = pruned_bpe_model(tmp_path, "qwen2")
    out = tmp_path / "m.gguf"
    first = run_cli("export", "--model", str(folder), "--out", str(out), "--json", "--quiet")
    assert "FFN width 51 is no multiple of 32" in first.stdout and "--width-multiple 32" in first.stdout
    summary = json.loads(first.stdout.splitlines()[-1])
    assert summary["ffn_width"] == read_manifest(folder)["k"] and summary["bytes"] == out.stat().st_size
    out.write_bytes(out.read_bytes())  # same content, new inode: the marker is what makes it ours
    run_cli("export", "--model", str(folder), "--out", str(out), "--overwrite", "--quiet")
    assert field(out, "general.architecture") == "qwen2"


def test_a_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    folder = pruned_bpe_model(tmp_path, "llama")
    calls = []

    def failing(tensor):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return tensor.half().numpy() if tensor.dim() > 1 else tensor.float().numpy()

    monkeypatch.setattr(gguf_export, "_as_array", failing)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(folder, tmp_path / "m.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def without_llama_cpp(monkeypatch):
    """``import llama_cpp`` fails from here on, as where the ``[gguf]`` extra is not installed."""
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)


def test_quantizing_without_llama_cpp_is_refused_before_any_work(tmp_path, monkeypatch):
    without_llama_cpp(monkeypatch)
    monkeypatch.setattr(gguf_export, "_write_f16", lambda *a: pytest.fail("did work"))
    with pytest.raises(ExportError, match=r"pip install 'prunenet\[gguf\]'"):
        export_gguf(tmp_path / "anything", tmp_path / "m.gguf", quant="q4_k_m")


def float16_model(folder):
    """The model of ``folder`` in float32 with every weight rounded to float16 first (what the F16 file holds)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())
    return model


def llama_cpp_logits(path, ids):
    from prunenet import llama_cpp_run

    return llama_cpp_run.logits(llama_cpp_run.load(path, n_ctx=64, logits_all=True, threads=1), ids)


IDS = torch.randint(0, 320, (24,), generator=torch.Generator().manual_seed(0)).tolist()


@needs_llama_cpp
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_gives_the_logits_of_transformers(tmp_path, family):
    folder = pruned_bpe_model(tmp_path, family)
    export_gguf(folder, tmp_path / "m.gguf", progress=False)
    with torch.no_grad():
        want = float16_model(folder)(torch.tensor([IDS])).logits[0].numpy()
    got = llama_cpp_logits(tmp_path / "m.gguf", IDS)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < LOGIT_TOLERANCE * np.abs(want).max()


@needs_llama_cpp
def test_without_reordering_the_rope_rows_llama_cpp_disagrees(tmp_path, monkeypatch):
    """The control of the test above: it can fail. The llama architecture's query/key rows left in Hugging
    Face's order give logits far outside the tolerance."""
    folder = pruned_bpe_model(tmp_path, "llama")
    monkeypatch.setitem(gguf_export.FAMILIES, "llama", gguf_export.Family("LLAMA", interleave_rope=False))
    export_gguf(folder, tmp_path / "m.gguf", progress=False)
    with torch.no_grad():
        want = float16_model(folder)(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(llama_cpp_logits(tmp_path / "m.gguf", IDS) - want).max() > 20 * LOGIT_TOLERANCE * np.abs(want).max()


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantized_files_report_llama_cpps_fallbacks(tmp_path, quant):
    """Tiny rows (hidden 32, FFN width 51) fit neither K-quant blocks (256) nor, for the width, 32-value ones:
    the types llama.cpp gave are read back from the file and the summary names the rows."""
    folder = pruned_bpe_model(tmp_path, "llama")
    proc = run_cli("export", "--model", str(folder), "--out", str(tmp_path / "m.gguf"), "--quant", quant, "--json")
    summary = json.loads(proc.stdout.splitlines()[-1])
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    matrices = {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    assert summary["types"] == dict(Counter(t.tensor_type.name for t in reader.tensors))
    down = {kind for name, kind in matrices.items() if ".ffn_down." in name}
    assert down == {"F16"}  # 51 values per row: no 32-value block divides them
    assert 51 in summary["fallbacks"]["F16"]
    assert "51 (the FFN width)" in proc.stdout and "--width-multiple" in proc.stdout
    if quant == "q8_0":
        assert {kind for name, kind in matrices.items() if ".ffn_up." in name} == {"Q8_0"}  # rows of 32


@needs_llama_cpp
@pytest.mark.slow
def test_the_pruned_embedded_model_in_llama_cpp_keeps_its_perplexity(tmp_path):
    """SmolLM2-135M pruned by the default method at ratio 0.2, F16 and Q4_K_M, perplexity on the first 2048
    held-out tokens in 256-token windows: llama.cpp against transformers on the same ids. Measured: F16 43.83 vs
    43.84 (0.02 %), Q4_K_M 45.14 (+3.0 %; the dense model's Q4_K_M: +5.7 %)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunenet import llama_cpp_run
    from prunenet.perplexity import perplexity, tokenize_prefix
    from prunenet.text import default_text

    folder = tmp_path / "pruned"
    compress_quietly("smollm2-135m", folder, ratio=0.2)
    tokenizer, text = AutoTokenizer.from_pretrained(folder), default_text()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    want = perplexity(model, tokenizer, text, max_tokens=2048, context=256, progress=False)["perplexity"]
    ids = tokenize_prefix(tokenizer, text, 2048).tolist()
    windows = [ids[i : i + 256] for i in range(0, len(ids), 256)]
    for quant, tolerance in (("f16", 0.01), ("q4_k_m", 0.10)):
        export_gguf(folder, tmp_path / f"{quant}.gguf", quant=quant, progress=False)
        got = llama_cpp_run.perplexity(
            llama_cpp_run.load(tmp_path / f"{quant}.gguf", n_ctx=256, logits_all=True), windows
        )
        assert abs(got / want - 1) < tolerance, (quant, got, want)


@needs_llama_cpp
def test_the_chosen_pre_tokenizer_splits_text_as_transformers(tmp_path):
    """The file names the llama.cpp pre-tokenizer that reproduced transformers' ids on the probe text; on other
    text (the tiny vocabulary's words, digits, punctuation) llama.cpp's ids are transformers' too."""
    import llama_cpp
    from tiny_models import tiny_text
    from transformers import AutoTokenizer

    folder = pruned_bpe_model(tmp_path, "llama")
    proc = run_cli("export", "--model", str(folder), "--out", str(tmp_path / "m.gguf"), "--json")
    pre = json.loads(proc.stdout.splitlines()[-1])["pre_tokenizer"]
    assert pre in gguf_export.PRE_TOKENIZERS and field(tmp_path / "m.gguf", "tokenizer.ggml.pre") == pre
    assert f"llama.cpp pre-tokenizer {pre!r}" in proc.stdout
    text = tiny_text(300, seed=7) + " 1234567, don't! (w5) " + gguf_export.PROBE_TEXT
    with gguf_export.native_output_captured():
        vocab = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    got = vocab.tokenize(text.encode(), add_bos=False, special=False)
    assert got == AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]


def test_without_llama_cpp_f16_is_written_with_the_default_pre_tokenizer_unchecked(tmp_path, monkeypatch):
    folder = pruned_bpe_model(tmp_path, "qwen3")
    without_llama_cpp(monkeypatch)
    result = export_gguf(folder, tmp_path / "m.gguf", progress=False)
    assert result.pre_tokenizer is None and field(tmp_path / "m.gguf", "tokenizer.ggml.pre") == "default"
    assert result.types == {"F16": 16, "F32": 9} and result.fallbacks == {}  # 2 blocks: q/k norms too
