"""Hostile sources: a checkpoint with a NaN or infinity in any tensor, or a config.json that does not describe
its checkpoint (a size of the wrong type or sign, another block count, another shape), is refused with exit
code 2 and one line naming the tensor or the field, and leaves nothing behind, for every method, in memory
and streaming. Config errors are refused before any work (no weights loaded or streamed).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_model, tiny_model, tiny_text
from untouched import refused

import prunenet.sources as sources
from prunenet import prune_
from prunenet.cli import main
from prunenet.config import CompressConfig
from prunenet.safetensors_io import read_chunks, read_header, read_tensor
from prunenet.sources import plan_source
from prunenet.streaming import CheckpointSource

NAN, INF = float("nan"), float("inf")

# (tensor, value written into one entry of it)
DAMAGED = {
    "nan-o-proj": ("model.layers.0.self_attn.o_proj.weight", NAN),
    "inf-down-proj": ("model.layers.1.mlp.down_proj.weight", INF),
    "nan-embedding": ("model.embed_tokens.weight", NAN),
    "minus-inf-norm": ("model.layers.0.input_layernorm.weight", -INF),
}

# (config.json field, value, a fragment of the one line). Types other than int are refused by transformers'
# strict configs where it has them, else by the adapter's size check: the line names the field either way.
CONFIGS = {
    "width-float": ("intermediate_size", 256.5, "intermediate_size"),
    "width-string": ("intermediate_size", "256", "intermediate_size"),
    "width-null": ("intermediate_size", None, "intermediate_size"),
    "width-negative": ("intermediate_size", -5, "config.json: intermediate_size must be a positive integer, got -5"),
    "width-zero": ("intermediate_size", 0, "config.json: intermediate_size must be a positive integer, got 0"),
    "width-huge": (
        "intermediate_size",
        10**12,
        "model.layers.0.mlp.gate_proj.weight has shape (74, 32) in the checkpoint, but config.json "
        "(intermediate_size 1000000000000, hidden_size 32) makes it (1000000000000, 32)",
    ),
    "hidden-other": ("hidden_size", 48, "(intermediate_size 74, hidden_size 48) makes it (74, 48)"),
    "layers-100000": ("num_hidden_layers", 100000, "config.json: num_hidden_layers is 100000, but the checkpoint"),
    "layers-fewer": ("num_hidden_layers", 1, "config.json: num_hidden_layers is 1, but the checkpoint"),
    "layers-float": ("num_hidden_layers", 2.5, "num_hidden_layers"),
    "layers-negative": ("num_hidden_layers", -2, "config.json: num_hidden_layers must be a positive integer, got -2"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Read-only inputs: a tiny llama, one copy per damaged tensor and per bad config field, and a text."""
    root = tmp_path_factory.mktemp("sources")
    save_tiny_model("llama", root / "model")
    for name, (tensor, value) in DAMAGED.items():
        shutil.copytree(root / "model", root / name)
        weights = load_file(root / name / "model.safetensors")
        weights[tensor].view(-1)[5] = value
        save_file(weights, root / name / "model.safetensors", metadata={"format": "pt"})
    for name, (field, value, _) in CONFIGS.items():
        shutil.copytree(root / "model", root / name)
        config = json.loads((root / name / "config.json").read_text())
        config[field] = value
        (root / name / "config.json").write_text(json.dumps(config))
    (root / "text.txt").write_text(tiny_text(800))
    return root


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """The run's current folder; the cache and HOME are redirected under ``tmp_path`` too."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))
    return folder


METHODS = {
    "random": ["--method", "random"],
    "magnitude": ["--method", "magnitude"],
    "prunenet": ["--method", "prunenet", "--episodes", "1"],
}
PATHS = {"in-memory": ["--no-streaming"], "streaming": ["--streaming"]}


def compress_argv(model: Path, *flags: str, out: str = "out") -> list[str]:
    return ["compress", "--model", str(model), "--ratio", "0.5", "--out", out, "--quiet", *flags]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("damage", list(DAMAGED))
def test_a_non_finite_weight_is_refused_naming_the_tensor(inputs, work, tmp_path, capsys, damage, method, path):
    line = refused(compress_argv(inputs / damage, *METHODS[method], *PATHS[path]), capsys, tmp_path, inputs)
    # A model loaded whole is named with its folder ("NAME in FOLDER holds ..."), a streamed tensor alone.
    assert re.search(rf"error: {re.escape(DAMAGED[damage][0])}( in \S+)? holds 1 NaN or infinite value\(s\)", line)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_non_finite_weight_is_refused_when_the_model_runs(inputs, work, tmp_path, capsys, path):
    """selfcal reads every block by running the model (offloaded when streaming): the tensor is named all the same."""
    argv = compress_argv(inputs / "nan-o-proj", "--method", "selfcal", "--probe-sequences", "1", *PATHS[path])
    line = refused(argv, capsys, tmp_path, inputs)
    assert re.search(r"model\.layers\.0\.self_attn\.o_proj\.weight( in \S+)? holds 1 NaN", line), line


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_config_that_does_not_describe_its_checkpoint_is_refused_before_any_work(
    inputs, work, tmp_path, capsys, monkeypatch, case, path
):  # fmt: skip
    def did_work(*args, **kwargs):
        raise AssertionError("weights were loaded or streamed")

    monkeypatch.setattr(sources.SourcePlan, "open", did_work)
    line = refused(compress_argv(inputs / case, *METHODS["random"], *PATHS[path]), capsys, tmp_path, inputs)
    assert CONFIGS[case][2] in line


def test_eval_refuses_non_finite_weights_naming_the_tensor(inputs, work, tmp_path, capsys):
    argv = ["eval", "--model", str(inputs / "inf-down-proj"), "--text-file", str(inputs / "text.txt"), "--quiet",
            "--max-tokens", "64", "--context", "32", "--json"]  # fmt: skip
    line = refused(argv, capsys, tmp_path, inputs)
    assert f"model.layers.1.mlp.down_proj.weight in {inputs / 'inf-down-proj'} holds 1 NaN or infinite" in line


@pytest.mark.parametrize("modules", ["ffn", "ffn+attn"])
@pytest.mark.parametrize("path", list(PATHS))
def test_the_free_space_estimate_is_the_output_tensors_bytes(inputs, tmp_path, modules, path):
    """Embeddings, norms and head keep their size: the estimate counts them whole, and the pruned tensors at
    what they keep, so it equals the bytes of the tensors written (headers and other files come on top)."""
    settings = CompressConfig(ratio=0.5, method="random", device="cpu", modules=modules,
                              streaming=path == "streaming")  # fmt: skip
    estimate = plan_source(inputs / "model", settings).output_bytes_at_least()
    flags = ["--modules", modules, *METHODS["random"], *PATHS[path]]
    argv = compress_argv(inputs / "model", *flags, out=str(tmp_path / "o"))
    assert main(argv) == 0
    assert estimate == CheckpointSource(tmp_path / "o").nbytes()
    assert estimate > 0.5 * CheckpointSource(inputs / "model").nbytes()  # what the estimate was before


def test_the_free_space_estimate_counts_the_dtype_written(inputs):
    settings = CompressConfig(ratio=0.5, method="random", device="cpu", dtype="fp16", streaming=False)
    fp16 = plan_source(inputs / "model", settings).output_bytes_at_least()
    fp32 = plan_source(inputs / "model", CompressConfig(ratio=0.5, device="cpu")).output_bytes_at_least()
    assert fp16 * 2 == fp32


def test_a_tensor_read_in_pieces_is_the_tensor(tmp_path):
    """The finiteness check of copied tensors reads them in bounded pieces; the pieces make up the tensor."""
    tensor = torch.randn(37, 11).to(torch.bfloat16)
    tensor[36, 10] = INF  # in the last, short piece
    save_file({"t": tensor}, tmp_path / "t.safetensors")
    (entry,) = read_header(tmp_path / "t.safetensors")[0].values()
    pieces = [piece.clone() for piece in read_chunks(entry, chunk_bytes=100)]
    assert [p.numel() for p in pieces] == [50] * 8 + [7]
    assert torch.equal(torch.cat(pieces), read_tensor(entry).view(-1))
    with pytest.raises(ValueError, match="t holds 1 NaN or infinite value"):
        CheckpointSource(tmp_path).check_finite()


def test_prune_refuses_a_model_with_a_non_finite_weight():
    """The Python API applies the same rule to the caller's model, before anything is sliced."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = NAN
    before = {name: t.shape for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.self_attn\.o_proj\.weight holds 1 NaN"):
        prune_(model, 0.5, method="random")
    assert {name: t.shape for name, t in model.state_dict().items()} == before
