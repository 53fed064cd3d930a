"""`compress` end to end on tiny models: the saved folder, the manifest, policy reuse, baselines,
and every bad input refused before any work, with no partial output left behind."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import transformers
from running import compress_policy_quietly, compress_quietly
from tiny_models import WIDTH, sample_inputs, save_tiny_model
from untouched import leftovers

import prunenet.models as models
import prunenet.pipeline as pipeline
import prunenet.train as train
from prunenet.adapters import UnsupportedModelError, get_adapter
from prunenet.checkpoint import MANIFEST_FILE, POLICY_FILE, load_policy
from prunenet.config import kept_width
from prunenet.dtypes import TORCH_DTYPES
from prunenet.model_errors import ModelLoadError, ModelNotFoundError
from prunenet.output import OutputFolderError

# The paper's policy unless a test names another method: three episodes, a real training run that is short on a
# tiny model.
run = functools.partial(compress_policy_quietly, ratio=0.25, episodes=3)


def test_kept_width_is_floor_and_robust_to_rounding():
    assert kept_width(0.3, 1536) == 1075
    assert kept_width(0.3, 10) == 7  # (1 - 0.3) * 10 is 6.999... in floating point
    assert kept_width(0.0, 74) == 74
    assert kept_width(0.99, 74) == 0


@pytest.mark.parametrize("method", ["prunenet", "random", "magnitude"])
def test_compress_writes_a_stock_loadable_model_and_a_truthful_manifest(tiny_dir, tmp_path, method):
    out = tmp_path / "out"
    result = run(tiny_dir, out, method=method, seed=4)
    k = kept_width(0.25, WIDTH)
    assert result.k == k and result.params_after < result.params_before
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["k"] == k and manifest["method"] == method and manifest["seed"] == 4
    assert manifest["ffn_width_before"] == WIDTH and manifest["prunenet_version"]
    assert (out / POLICY_FILE).exists() == (method == "prunenet")

    dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert pruned.config.intermediate_size == k
    assert transformers.AutoTokenizer.from_pretrained(out)("w5 w6")["input_ids"] == [5, 6]
    for layer, keep in enumerate(manifest["kept_indices"]):
        assert len(keep) == k and keep == sorted(set(keep))
        for name in ("gate_proj", "up_proj"):
            w = dense.get_parameter(f"model.layers.{layer}.mlp.{name}.weight")
            assert torch.equal(pruned.get_parameter(f"model.layers.{layer}.mlp.{name}.weight"), w[keep])
        down = dense.get_parameter(f"model.layers.{layer}.mlp.down_proj.weight")
        assert torch.equal(pruned.get_parameter(f"model.layers.{layer}.mlp.down_proj.weight"), down[:, keep])
    if method == "magnitude":
        for layer, keep in enumerate(manifest["kept_indices"]):
            norms = dense.get_parameter(f"model.layers.{layer}.mlp.gate_proj.weight").norm(dim=1)
            assert keep == sorted(torch.topk(norms, k).indices.tolist())


def test_seeds_make_selection_reproducible(tiny_dir, tmp_path):
    keeps = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run(tiny_dir, tmp_path / name, method="random", seed=seed)
        keeps.append(json.loads((tmp_path / name / MANIFEST_FILE).read_text())["kept_indices"])
    assert keeps[0] == keeps[1] != keeps[2]


def test_policy_reuse_skips_training_and_rejects_other_shapes(tiny_dir, tmp_path, monkeypatch):
    run(tiny_dir, tmp_path / "trained", ratio=0.25)
    policy = load_policy(tmp_path / "trained")
    assert policy.shape == (32, WIDTH)

    def no_training(*args, **kwargs):
        raise AssertionError("training must not run when --policy is given")

    monkeypatch.setattr(train, "train_policy", no_training)
    result = run(tiny_dir, tmp_path / "reused", ratio=0.5, policy=tmp_path / "trained" / POLICY_FILE, selection="topk")
    assert result.k == kept_width(0.5, WIDTH)
    with torch.no_grad():
        dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
        logits = policy.logits(dense.get_parameter("model.layers.0.mlp.gate_proj.weight"))
    manifest = json.loads((tmp_path / "reused" / MANIFEST_FILE).read_text())
    assert manifest["kept_indices"][0] == sorted(torch.topk(logits, result.k).indices.tolist())

    other = tmp_path / "other"
    save_tiny_model("gpt2", other)  # (d, n) = (32, 128): a different FFN width
    with pytest.raises(ValueError, match=r"n=74, d=32.*n=128, d=32"):
        compress_quietly(other, tmp_path / "x", ratio=0.2, method="prunenet", policy=tmp_path / "trained")


def test_ratio_zero_keeps_everything_and_logits_are_unchanged(tiny_dir, tmp_path):
    run(tiny_dir, tmp_path / "out", ratio=0.0)
    dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    same = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(dense(sample_inputs()).logits, same(sample_inputs()).logits)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")], ids=["negative", "one", "above-one", "nan"])
def test_bad_ratio_fails_before_any_work(tiny_dir, tmp_path, monkeypatch, ratio):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        run(tiny_dir, tmp_path / "out", ratio=ratio)
    assert not (tmp_path / "out").exists()


def test_ratio_leaving_no_rows_fails_before_loading_weights(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match="leaves no FFN neurons"):
        run(tiny_dir, tmp_path / "out", ratio=0.99)


def test_missing_and_unsupported_models_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError):
        run(tmp_path / "does-not-exist", tmp_path / "out")
    bert = tmp_path / "bert"
    transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    ).save_pretrained(bert)
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        run(bert, tmp_path / "out")


def test_output_folder_rules(tiny_dir, tmp_path):
    with pytest.raises(OutputFolderError, match="source model"):
        run(tiny_dir, tiny_dir)
    with pytest.raises(OutputFolderError, match="source model"):
        run(tiny_dir, tiny_dir / "sub")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for overwrite in (False, True):  # not prunenet's: never replaced
        with pytest.raises(OutputFolderError, match="precious.txt, which prunenet did not write"):
            run(tiny_dir, out, overwrite=overwrite)
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    (out / "precious.txt").unlink()
    run(tiny_dir, out)
    with pytest.raises(OutputFolderError, match="--overwrite"):
        run(tiny_dir, out, ratio=0.5)
    run(tiny_dir, out, ratio=0.5, overwrite=True)  # an earlier prunenet output: replaced
    assert json.loads((out / MANIFEST_FILE).read_text())["ratio"] == 0.5
    assert leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    run(tiny_dir, empty)  # an existing empty folder is fine
    with pytest.raises(OutputFolderError, match="parent folder"):
        run(tiny_dir, tmp_path / "missing" / "out")


def test_failure_while_saving_leaves_no_output_and_keeps_the_old_one(tiny_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "save_policy", broken)
    with pytest.raises(OSError, match="disk full"):
        run(tiny_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []

    monkeypatch.undo()
    old = tmp_path / "old"
    run(tiny_dir, old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    monkeypatch.setattr(pipeline, "save_policy", broken)
    with pytest.raises(OSError, match="disk full"):
        run(tiny_dir, old, ratio=0.5, overwrite=True)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before and leftovers(tmp_path, "old") == []


def test_truncated_weights_are_a_clear_error(tiny_dir, tmp_path):
    weights = tiny_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        run(tiny_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "best"}, "prunenet, random, magnitude"),
        ({"selection": "greedy"}, "sample, topk"),
        ({"dtype": "fp8"}, "fp32, fp16, bf16"),
        ({"episodes": 0}, "at least 1"),
        ({"method": "random", "policy": "x"}, "only to --method prunenet"),
    ],
    ids=["method", "selection", "dtype", "episodes", "policy-with-random"],
)
def test_bad_options_are_rejected_before_any_work(tiny_dir, tmp_path, monkeypatch, kwargs, match):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=match):
        run(tiny_dir, tmp_path / "out", **kwargs)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_compress_saves_that_dtype(tiny_dir, tmp_path, dtype):
    run(tiny_dir, tmp_path / "out", dtype=dtype)
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert pruned.dtype == TORCH_DTYPES[dtype]
    assert get_adapter(pruned.config).ffn_width(pruned.config) == kept_width(0.25, WIDTH)
