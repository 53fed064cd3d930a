"""Benchmark and research scripts on tiny inputs: bench_compress.py and summary.py (rows, tags, ratios,
output) and selection_variants.py (the weight-only variants the selection study measures)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from bench_loader import load_benchmark
from tiny_models import save_tiny_model


def test_bench_compress_appends_tagged_rows(tmp_path, capsys):
    folder = tmp_path / "tiny"
    save_tiny_model("llama", folder)
    out = tmp_path / "compress.csv"
    args = ["--model", str(folder), "--episodes", "1", "--repeats", "1", "--device", "cpu", "--out", str(out)]
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
