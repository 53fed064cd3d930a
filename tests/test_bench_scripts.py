"""benchmarks/bench_compress.py and benchmarks/summary.py on tiny inputs: rows, tags, ratios, output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

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
