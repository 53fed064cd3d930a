"""Benchmark and research scripts on tiny inputs: bench_compress.py and summary.py (rows, tags, ratios,
output), selection_variants.py (the weight-only variants the selection study measures) and the selection
study's self-calibration variants and report."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from bench_loader import load_benchmark
from tiny_models import tiny_model, tiny_text, tiny_tokenizer


def test_bench_compress_appends_tagged_rows(tiny_dir, tmp_path, capsys):
    out = tmp_path / "compress.csv"
    args = ["--model", str(tiny_dir), "--episodes", "1", "--repeats", "1", "--device", "cpu", "--out", str(out)]
    assert load_benchmark("bench_compress").main([*args, "--quiet", "--json"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(printed.strip().splitlines()[-1])
    assert [r["path"] for r in rows] == ["fast", "torch"] and "torch path / fast path: wall_s" in printed
    with open(out, newline="") as f:
        saved = list(csv.DictReader(f))
    assert len(saved) == 2 and all(saved[0][k] for k in ("date", "git", "torch", "device", "command"))
    assert float(saved[0]["wall_s"]) > float(saved[0]["train_s"]) > 0 and float(saved[0]["peak_rss_mb"]) > 50
    assert int(saved[0]["params_after"]) < int(saved[0]["params_before"])


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_summary_latest_rows_medians_and_ratios(tmp_path, capsys):
    base = {"timestamp": "", "git_revision": "a", "device_name": "cpu", "model": "m", "dtype": "fp16"}
    _write(tmp_path / "slicing_cpu.csv", [
        {**base, "timestamp": "t1", "backend": "native", "time_ms": "9.0", "command": "x"},
        {**base, "timestamp": "t1", "backend": "torch", "time_ms": "9.0", "command": "x"},
        {**base, "timestamp": "t2", "backend": "native", "time_ms": "2.0", "command": "x"},  # newer run
        {**base, "timestamp": "t2", "backend": "torch", "time_ms": "5.0", "command": "x"},
    ])  # fmt: skip
    _write(tmp_path / "quality.csv", [
        {"date": "d", "git": "g", "text": "t", "method": "random", "ratio": "0.1", "seed": str(s),
         "perplexity": str(p)} for s, p in enumerate([10, 30, 20])
    ])  # fmt: skip
    summary = load_benchmark("summary")
    assert summary.main(["--results", str(tmp_path), "--json"]) == 0
    printed = capsys.readouterr().out
    data = json.loads(printed.strip().splitlines()[-1])
    slicing = data["slicing_cpu"]
    assert [r["time_ms"] for r in slicing["rows"]] == ["2.0", "5.0"]
    assert slicing["ratios"] == [{"device_name": "cpu", "model": "m", "dtype": "fp16", "pair": "torch/native",
                                  "time_ms": "2.50x"}]  # fmt: skip
    assert data["quality"]["rows"][0]["perplexity"] == "20" and data["quality"]["rows"][0]["seed"] == "n=3"
    tables = printed.strip().rsplit("\n", 1)[0]  # all but the JSON line
    assert "== slicing_cpu.csv" in tables and "torch/native" in tables and "command" not in tables
    assert summary.main(["--results", str(tmp_path), "nope"]) == 2


def test_super_weight_neurons_finds_an_injected_outlier():
    variants = load_benchmark("selection_variants")
    g = torch.Generator().manual_seed(0)
    down = torch.randn(74, 32, generator=g) * 0.02  # (n, d): out-projection columns as rows
    assert variants.super_weight_neurons([down]).numel() == 0
    down[11, 5] = 5.0
    assert variants.super_weight_neurons([down]).tolist() == [11]


@pytest.mark.parametrize("reward", ["ks", "ks3", "w1", "energy"])
def test_weight_only_objectives_prefer_keeping_everything_and_variants_are_seeded(reward):
    variants = load_benchmark("selection_variants")
    g = torch.Generator().manual_seed(0)
    data = [variants.LayerData.of([torch.randn(40, 12, generator=g) for _ in range(3)]) for _ in range(2)]
    everything, half = torch.arange(40), torch.arange(0, 40, 2)
    assert data[0].objective(reward, everything) > data[0].objective(reward, half)
    a = variants.train_variant(data, 30, reward=reward, episodes=2, seed=1, baseline=True, inputs="concat")
    b = variants.train_variant(data, 30, reward=reward, episodes=2, seed=1, baseline=True, inputs="concat")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and a[0].shape == (40,)


def test_selection_study_variants_choose_k_neurons_and_leave_the_model_dense(tmp_path):
    """The self-calibration variants and the real-text references of selection_study.py on a tiny model whose
    first FFN dominates the residual stream, so pruning it moves what the second layer sees."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(50.0)
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    study_module = load_benchmark("selection_study")
    study = study_module.Study(str(tmp_path / "tiny"), max_tokens=64)
    study.texts = {"pre1900": tiny_text(8000, seed=1), "post1900": tiny_text(8000, seed=2)}  # in its vocabulary
    k = study.width // 2
    methods = ["selfcal-wanda-gen", "selfcal-wanda-gen-t07", "selfcal-wanda-gen-starts", "selfcal-wanda-seq",
               "calib-pre1900", "calib-post1900"]  # fmt: skip
    keeps = {m: study.select(m, k, seed=0) for m in methods}
    for m, chosen in keeps.items():
        assert len(chosen) == study.layers, m
        assert all(c.shape == (k,) and torch.equal(c, c.unique()) and int(c.max()) < study.width for c in chosen), m
    assert all(torch.equal(p, o) for p, o in zip(study.out_params, study.original, strict=True))  # dense again
    # Layer 0 sees the same inputs whether or not later layers are pruned; later layers see pruned inputs.
    assert torch.equal(keeps["selfcal-wanda-seq"][0], keeps["selfcal-wanda-gen"][0])

    def same(a: str, b: str) -> bool:
        return all(torch.equal(x, y) for x, y in zip(keeps[a], keeps[b], strict=True))

    assert not same("selfcal-wanda-seq", "selfcal-wanda-gen") and not same("calib-pre1900", "calib-post1900")
    pre, post = study.calibration_ids("pre1900", 0), study.calibration_ids("post1900", 0)
    assert pre.shape == post.shape == (8, 128) and not torch.equal(pre, post)
    assert not torch.equal(study.calibration_ids("pre1900", 1), pre)  # a seed is another window
    starts = study.probes("generate", 0, starts=True)
    assert starts.shape == study.probes("generate", 0).shape and starts[:, 1].unique().numel() > 1


def test_selection_study_calibration_summary_verdicts():
    study_module = load_benchmark("selection_study")

    def rows(method, text, *values):
        return [{"model": "m", "stage": "s", "ratio": "0.2", "method": method, "text": text, "perplexity": str(v)}
                for v in values]  # fmt: skip

    data = []
    for text, same, other, shipped in (("pre1900", 20, 40, 25), ("post1900", 20, 30, 31)):
        other_text = "post1900" if text == "pre1900" else "pre1900"
        data += rows("dense", text, 10) + rows(f"calib-{text}", text, same, same + 1, same - 1)
        data += rows(f"calib-{other_text}", text, other) + rows("selfcal-wanda-gen", text, shipped)
    table = "\n".join(study_module.calibration_summary(data))
    pre, post = (line for line in table.splitlines() if line.startswith("| `m`"))
    assert "| 25.0 | 40.0 | 20.0 | 1.25 | yes | yes |" in pre  # beats other, within 30 % of same
    assert "| 31.0 | 30.0 | 20.0 | 1.55 | no | no |" in post


def test_compensation_study_masks_as_slicing_and_compensating_would():
    """compensation_study.py's H has the library's activation statistics on its diagonal, and its mask with the
    refitted columns gives the logits of the model sliced and compensated by the library."""
    import copy

    from prunenet.activations import activation_stats
    from prunenet.adapters import get_adapter
    from prunenet.compensation import ColumnStore, compensated_columns, write_columns_
    from prunenet.selfcal import top_k
    from prunenet.slicing import slice_model_

    study = load_benchmark("compensation_study")
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    ids = torch.randint(3, 100, (4, 24), generator=torch.Generator().manual_seed(0))
    hs = study.grams(model, ids)
    stats = activation_stats(model, ids)
    assert torch.allclose(torch.stack([h.diagonal() for h in hs]) / ids.numel(), stats.mean_square(), rtol=1e-9)
    masker = study.Masker(model)
    k = adapter.ffn_width(model.config) * 2 // 3
    keeps = [top_k(h.diagonal(), k) for h in hs]
    columns = [compensated_columns(h, w, keep, 1.0) for h, w, keep in zip(hs, masker.dense, keeps, strict=True)]
    sliced = copy.deepcopy(model)
    slice_model_(sliced, adapter, keeps, progress=False)
    store = ColumnStore()
    for unit, c in enumerate(columns):
        store.put(unit, c)
    write_columns_(sliced, store)
    masker.apply(keeps, columns)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, sliced(ids).logits, atol=1e-5)
        masker.restore()
        assert all(torch.equal(p, d) for p, d in zip(masker.params, masker.dense, strict=True))
        assert not torch.allclose(model(ids).logits, sliced(ids).logits, atol=1e-3)  # the dense model again


def test_inference_speed_rows_hold_the_pruned_widths_and_their_bounds(tmp_path):
    """inference_speed.py on the tiny shape: a row per (ratio, multiple) at the width --width-multiple gives, and
    the bounds are the ratios of the bytes in the checkpoints (read independently with safetensors)."""
    study = load_benchmark("inference_speed")
    out, work = tmp_path / "speed.csv", tmp_path / "work"
    args = ["--shapes", "tiny", "--dtypes", "fp32", "--ratios", "0.3", "--multiples", "1", "64", "--repeats", "1",
            "--runtimes", "transformers"]  # fmt: skip
    assert study.main([*args, "--new-tokens", "2", "--csv", str(out), "--work", str(work)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["ratio"], r["width_multiple"], r["ffn_width"]) for r in rows] == [
        ("0.0", "1", "172"),
        ("0.3", "1", "120"),
        ("0.3", "64", "64"),
    ]
    assert_rows_hold_their_bounds(rows, work, lambda shape: 4)  # fp32, the worker's dtype


def checkpoint_bytes(folder: Path, leave_out: tuple[str, ...], value_bytes) -> int:
    """Bytes of the checkpoint's tensors at ``value_bytes(shape)`` bytes per value (read with safetensors), those
    named with ``leave_out`` left out."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        shapes = [f.get_slice(name).get_shape() for name in f.keys() if not any(p in name for p in leave_out)]
    return sum(value_bytes(shape) * torch.Size(shape).numel() for shape in shapes)


def assert_rows_hold_their_bounds(rows: list[dict], work: Path, value_bytes) -> None:
    """Each pruned row's bounds are the ratios of the dense and pruned checkpoints' bytes: read per token (all but
    the input embedding) for decode, the blocks' for prefill."""
    dense = work / "tiny-2blocks"
    for row in rows[1:]:
        pruned = work / f"tiny-2-k{row['ffn_width']}"
        read, blocks = (
            checkpoint_bytes(dense, leave_out, value_bytes) / checkpoint_bytes(pruned, leave_out, value_bytes)
            for leave_out in (("embed_tokens",), ("embed_tokens", "lm_head"))
        )
        assert float(row["decode_bound"]) == pytest.approx(read, abs=1e-3)
        assert float(row["prefill_bound"]) == pytest.approx(blocks, abs=1e-3)
        assert float(row["decode1_tok_s"]) > 0 and int(row["peak_rss_bytes"]) > 0


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="the [gguf] extra (llama-cpp-python) is not "
                    "installed: pip install 'prunenet[gguf]'")  # fmt: skip
def test_inference_speed_llama_cpp_rows_hold_the_gguf_widths_and_their_bounds(tmp_path):
    """The llama.cpp rows: one per (ratio, multiple) at the width --width-multiple gives, from F16 files whose byte
    counts (2 bytes per matrix value, 4 per norm value, from the safetensors shapes) give the bounds."""
    study = load_benchmark("inference_speed")
    out, work = tmp_path / "speed.csv", tmp_path / "work"
    args = ["--shapes", "tiny", "--ratios", "0.3", "--gguf-multiples", "1", "32", "--repeats", "1", "--runtimes",
            "llama.cpp", "--quants", "f16", "--new-tokens", "2", "--csv", str(out), "--work", str(work)]  # fmt: skip
    assert study.main(args) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["runtime"], r["dtype"], r["ratio"], r["width_multiple"], r["ffn_width"]) for r in rows] == [
        ("llama.cpp", "f16", "0.0", "1", "172"),
        ("llama.cpp", "f16", "0.3", "1", "120"),
        ("llama.cpp", "f16", "0.3", "32", "96"),
    ]

    assert_rows_hold_their_bounds(rows, work, lambda shape: 2 if len(shape) > 1 else 4)  # F16, norms F32
    assert all(row["decode8_tok_s"] == "" for row in rows)


def test_inference_speed_worker_counts_a_tied_head_as_read(tmp_path):
    """A tied head is the embedding table: the decode step reads all of it, so the bytes read are every stored
    tensor, and the blocks are every stored tensor but that one."""
    import transformers
    from safetensors import safe_open
    from tiny_models import tiny_model

    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "tied")
    tiny_tokenizer().save_pretrained(tmp_path / "tied")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "tied").tie_word_embeddings
    spec = {"model": str(tmp_path / "tied"), "dtype": "fp32", "device": "cpu", "new_tokens": 1}
    found = load_benchmark("inference_speed").worker(spec)
    with safe_open(str(tmp_path / "tied" / "model.safetensors"), "pt") as f:
        sizes = {name: 4 * torch.Size(f.get_slice(name).get_shape()).numel() for name in f.keys()}
    assert "lm_head.weight" not in sizes  # stored once, as the embedding
    assert found["read_bytes"] == found["weight_bytes"] == sum(sizes.values())
    assert found["block_bytes"] == sum(v for name, v in sizes.items() if "embed_tokens" not in name)
