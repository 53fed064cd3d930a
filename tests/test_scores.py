"""Scores once, any ratio: ``scores.safetensors`` in a selfcal output, ``--scores`` and ``--ratio 0.1,0.2,0.3``.

The scores are checked against Wanda's score computed here from the model's own activations in float64; a run
from saved scores against a fresh run at the same ratio (kept neurons and every written tensor, bit for bit), in
memory, streamed and under torchrun; several ratios against separate runs.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch
import transformers
from running import compress_quietly, run_cli
from safetensors.torch import save_file
from tiny_models import all_tensors, save_sharded, save_tiny_model

import prunenet.pipeline
from prunenet.checkpoint import POLICY_FILE, read_manifest
from prunenet.scores import SCORES_FILE, load_scores
from prunenet.selfcal import top_k

compress = functools.partial(compress_quietly, seed=3)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scores") / "llama"
    save_tiny_model("llama", folder)
    return folder


@pytest.fixture(scope="module")
def first(source, tmp_path_factory):
    """A fresh selfcal run at ratio 0.1: the scores every other test prunes from."""
    out = tmp_path_factory.mktemp("first") / "r0.1"
    compress(source, out, ratio=0.1)
    return out


def same_output(a, b) -> None:
    """``a`` and ``b`` keep the same neurons and hold the same tensors and scores, bit for bit."""
    assert read_manifest(a)["kept_indices"] == read_manifest(b)["kept_indices"]
    ta, tb = all_tensors(a), all_tensors(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[name], tb[name]) for name in ta), [n for n in ta if not torch.equal(ta[n], tb[n])]
    assert (a / SCORES_FILE).exists() == (b / SCORES_FILE).exists()
    if (a / SCORES_FILE).exists():
        sa, sb = load_scores(a), load_scores(b)
        assert torch.equal(sa.scores, sb.scores) and sa.ids_sha256 == sb.ids_sha256


def test_the_scores_are_wandas_on_the_probes_they_hold(source, first):
    """Every neuron's score is sqrt(mean h_j^2) * ||W_down[:, j]||, recomputed here in float64 from the
    dense model's activations on the stored probes; the metadata says how they were measured."""
    scores = load_scores(first / SCORES_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    layers = model.model.layers
    squares = [torch.zeros(model.config.intermediate_size, dtype=torch.float64) for _ in layers]

    def hook(i, module, args):
        squares[i] += args[0].double().pow(2).reshape(-1, args[0].shape[-1]).sum(0)

    handles = [layer.mlp.down_proj.register_forward_pre_hook(functools.partial(hook, i)) for i, layer in
               enumerate(layers)]  # fmt: skip
    with torch.no_grad():
        model(scores.probe_ids)
    for h in handles:
        h.remove()
    tokens = scores.probe_ids.numel()
    expected = torch.stack([(sq / tokens).sqrt() * layer.mlp.down_proj.weight.double().norm(dim=0)
                            for sq, layer in zip(squares, layers, strict=True)])  # fmt: skip
    assert scores.scores.dtype == torch.float32 and scores.scores.shape == expected.shape
    torch.testing.assert_close(scores.scores.double(), expected, rtol=1e-5, atol=0)
    assert scores.probes == {"sequences": 8, "length": 128, "seed": 3} and scores.method == "selfcal"
    assert scores.probe_ids.shape[0] == 8 and scores.calibration is None
    assert scores.fingerprint["units"] == model.config.num_hidden_layers
    manifest = read_manifest(first)
    assert manifest["scores"] == SCORES_FILE and SCORES_FILE in manifest["files"]
    k = manifest["k"]
    assert manifest["kept_indices"] == [top_k(row, k).tolist() for row in expected.float()]


@pytest.mark.parametrize("compensate", [True, False])
def test_a_run_from_scores_is_a_fresh_run(source, first, tmp_path, compensate):
    compress(source, tmp_path / "fresh", ratio=0.3, compensate=compensate)
    result = compress(source, tmp_path / "scored", ratio=0.3, compensate=compensate, scores=str(first))
    same_output(tmp_path / "fresh", tmp_path / "scored")
    timings = read_manifest(tmp_path / "scored")["timings_s"]
    assert "probe_s" not in timings and "stats_s" not in timings  # the probes came from the file
    assert ("compensate_s" in timings) == compensate
    assert result.scored_from == str(first)
    assert read_manifest(tmp_path / "scored")["scores_source"]["path"] == str(first)
    # the output's own scores are those it was cut from: a chain of runs stays exact
    a, b = load_scores(first), load_scores(tmp_path / "scored")
    assert torch.equal(a.scores, b.scores) and torch.equal(a.probe_ids, b.probe_ids)


def test_scores_serve_a_streamed_run(tmp_path):
    """Measured in memory, used streamed (and the other way): the fingerprint does not depend on the path."""
    source = tmp_path / "src"
    save_sharded("llama", source)
    compress(source, tmp_path / "memory", ratio=0.1, streaming=False)
    streamed = dict(streaming=True, max_memory="1GiB")
    compress(source, tmp_path / "fresh", ratio=0.3, **streamed)
    compress(source, tmp_path / "scored", ratio=0.3, scores=str(tmp_path / "memory"), **streamed)
    same_output(tmp_path / "fresh", tmp_path / "scored")
    compress(source, tmp_path / "back", ratio=0.3, scores=str(tmp_path / "fresh" / SCORES_FILE), streaming=False)
    same_output(tmp_path / "fresh", tmp_path / "back")


def test_prune_in_python_from_scores(source, first):
    fresh = transformers.AutoModelForCausalLM.from_pretrained(source)
    scored = transformers.AutoModelForCausalLM.from_pretrained(source)
    a = prunenet.pipeline.prune_(fresh, 0.3, seed=3)
    b = prunenet.pipeline.prune_(scored, 0.3, scores=first / SCORES_FILE)
    assert [k.tolist() for k in a.keeps] == [k.tolist() for k in b.keeps]
    assert torch.equal(a.scores.scores, b.scores.scores)
    sa, sb = fresh.state_dict(), scored.state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)


def test_several_ratios_are_separate_runs(source, tmp_path):
    results = compress(source, tmp_path / "all", ratio=[0.3, 0.1, 0.2])
    assert [r.ratio for r in results] == [0.3, 0.1, 0.2]
    assert sorted(os.listdir(tmp_path / "all")) == ["r0.1", "r0.2", "r0.3"]
    assert [r.scored_from for r in results] == [None, *[str(tmp_path / "all" / "r0.3" / SCORES_FILE)] * 2]
    for ratio in (0.1, 0.2, 0.3):
        compress(source, tmp_path / f"alone{ratio}", ratio=ratio)
        same_output(tmp_path / f"alone{ratio}", tmp_path / "all" / f"r{ratio}")
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "all" / f"r{ratio}")  # stock reload
        assert model.config.intermediate_size == read_manifest(tmp_path / "all" / f"r{ratio}")["k"]


def test_several_ratios_of_another_method_run_each(source, tmp_path):
    compress(source, tmp_path / "all", ratio=(0.1, 0.2), method="prunenet", episodes=2)
    compress(source, tmp_path / "alone", ratio=0.2, method="prunenet", episodes=2)
    same_output(tmp_path / "alone", tmp_path / "all" / "r0.2")
    assert POLICY_FILE in os.listdir(tmp_path / "all" / "r0.1")
    assert SCORES_FILE not in os.listdir(tmp_path / "all" / "r0.1")  # no activation scores: nothing to reuse


def test_a_failing_ratio_leaves_the_others_complete(source, tmp_path, monkeypatch):
    real = prunenet.pipeline._compress_into

    def failing(target, out, model, path, config, *args):
        if config.ratio == 0.2:
            raise OSError("disk full, on purpose")
        return real(target, out, model, path, config, *args)

    monkeypatch.setattr(prunenet.pipeline, "_compress_into", failing)
    with pytest.raises(OSError, match="on purpose"):
        compress(source, tmp_path / "all", ratio=[0.1, 0.2, 0.3])
    assert sorted(os.listdir(tmp_path / "all")) == ["r0.1", "r0.3"]  # nothing of r0.2, not even a partial folder
    compress(source, tmp_path / "alone", ratio=0.3)
    same_output(tmp_path / "alone", tmp_path / "all" / "r0.3")


@pytest.mark.parametrize(
    "ratio, message",
    [("0.2,abc", "'abc' is not a number"), ("1.2", "must be in [0, 1)"), ("0.1,0.2,0.1", "lists 0.1 twice"),
     ("0.1,,0.2", "'' is not a number"), ("nan", "must be in [0, 1)")],
)  # fmt: skip
def test_a_bad_ratio_list_is_refused_before_any_work(source, tmp_path, ratio, message):
    proc = run_cli("compress", "--model", str(source), "--ratio", ratio, "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_occupied_ratio_folder_is_refused_before_any_work(source, tmp_path):
    (tmp_path / "all" / "r0.2").mkdir(parents=True)
    (tmp_path / "all" / "r0.2" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="prunenet did not write"):
        compress(source, tmp_path / "all", ratio=[0.1, 0.2])
    assert sorted(os.listdir(tmp_path / "all")) == ["r0.2"]


def test_the_command_line_prunes_several_ratios(source, tmp_path):
    proc = run_cli("compress", "--model", str(source), "--ratio", "0.1,0.2", "--out", str(tmp_path / "out"),
                   "--quiet", "--json")  # fmt: skip
    outputs = __import__("json").loads(proc.stdout.strip().splitlines()[-1])["outputs"]
    assert [(o["ratio"], o["method"]) for o in outputs] == [(0.1, "selfcal"), (0.2, "selfcal")]
    assert proc.stdout.count("selfcal (from --scores)") == 1


def write_variant(first, path, **changes) -> None:
    """``first``'s scores file rewritten with ``changes`` to its tensors (``scores=``) or metadata."""
    scores = load_scores(first)
    tensors = {k: v for k, v in changes.items() if k in ("scores", "probe_ids")}
    dataclasses.replace(scores, **tensors).save(path)


@pytest.mark.parametrize("case", ["other-width", "other-family", "policy", "nan", "not-safetensors", "missing"])
def test_a_scores_file_that_does_not_fit_is_refused(source, first, tmp_path, case):
    scores = tmp_path / "scores.safetensors"
    model = source
    if case == "other-width":  # the same family, another FFN width
        model = tmp_path / "wide"
        config = transformers.AutoConfig.from_pretrained(source)
        config.intermediate_size += 8
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model)
        transformers.AutoTokenizer.from_pretrained(source).save_pretrained(model)
    elif case == "other-family":
        model = tmp_path / "phi3"
        save_tiny_model("phi3", model)
    if case in ("other-width", "other-family"):
        scores = first
    elif case == "policy":
        save_file({"proj.weight": torch.zeros(2, 2)}, str(scores), metadata={"ffn_width": "2"})
    elif case == "nan":
        bad = load_scores(first).scores.clone()
        bad[0, 3] = float("nan")
        write_variant(first, scores, scores=bad)
    elif case == "not-safetensors":
        scores.write_text("not a scores file")
    args = ["compress", "--model", str(model), "--ratio", "0.3", "--out", str(tmp_path / "out"), "--scores"]
    proc = run_cli(*args, str(scores) if case != "missing" else str(tmp_path / "none"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    expected = {
        "other-width": "FFN width",
        "other-family": "another model",
        "policy": "not a prunenet scores",
        "nan": "non-finite",
        "not-safetensors": "could not read",
        "missing": "no scores file",
    }[case]
    assert expected in proc.stderr
    assert not (tmp_path / "out").exists()


def test_settings_other_than_the_scores_are_refused(source, first, tmp_path):
    with pytest.raises(ValueError, match="--seed 4 differs from the 3"):
        compress(source, tmp_path / "out", ratio=0.3, scores=str(first), seed=4)
    with pytest.raises(ValueError, match="applies only to --method selfcal"):
        compress(source, tmp_path / "out", ratio=0.3, scores=str(first), method="magnitude")
    assert not (tmp_path / "out").exists()
    # a setting left at its default takes the file's: seed 3 here, though the default is 0
    result = compress_quietly(source, tmp_path / "out", ratio=0.3, scores=str(first), compensate=False)
    assert read_manifest(result.out)["seed"] == 3


def test_scores_of_calibration_text_need_that_text_to_compensate(source, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 40}" for i in range(6000)))
    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"w{(7 * i) % 40}" for i in range(6000)))
    compress(source, tmp_path / "a", ratio=0.1, calibration=str(text), probe_length=32)
    scores = load_scores(tmp_path / "a")
    assert scores.probe_ids is None and scores.calibration is not None  # the user's text is not stored
    with pytest.raises(ValueError, match="give the same --calibration again"):
        compress(source, tmp_path / "b", ratio=0.3, scores=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="is not the text"):
        compress(source, tmp_path / "b", ratio=0.3, scores=str(tmp_path / "a"), calibration=str(other))
    compress(source, tmp_path / "fresh", ratio=0.3, calibration=str(text), probe_length=32)
    compress(source, tmp_path / "scored", ratio=0.3, scores=str(tmp_path / "a"), calibration=str(text))
    same_output(tmp_path / "fresh", tmp_path / "scored")
    compress(source, tmp_path / "plain", ratio=0.3, scores=str(tmp_path / "a"), compensate=False)
    assert read_manifest(tmp_path / "plain")["kept_indices"] == read_manifest(tmp_path / "fresh")["kept_indices"]


@pytest.mark.slow
def test_scores_under_torchrun(tmp_path):
    """Two ranks cut from a single process's scores: the single process's fresh result."""
    from test_distributed import free_port

    source = tmp_path / "src"
    save_sharded("llama", source)
    compress(source, tmp_path / "first", ratio=0.1)
    compress(source, tmp_path / "fresh", ratio=0.3, streaming=True, max_memory="1GiB")
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    args = ["compress", "--model", str(source), "--out", str(tmp_path / "two"), "--ratio", "0.3", "--device", "cpu",
            "--quiet", "--scores", str(tmp_path / "first")]  # fmt: skip
    proc = run_cli(*args, launcher=torchrun, check=False, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    same_output(tmp_path / "fresh", tmp_path / "two")
