"""The command line as users script against it: both entry points, --help, exit codes, --json."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from running import run_cli
from tiny_models import tiny_text

from prunenet.cli import build_parser, main

BIN = Path(sys.executable).parent


def test_help_documents_every_flag():
    compress_flags = ["--model", "--ratio", "--out", "--method", "--episodes", "--policy", "--selection", "--seed",
                      "--device", "--dtype", "--overwrite", "--kl", "--json", "--reward-backend"]  # fmt: skip
    eval_flags = ["--model", "--text-file", "--max-tokens", "--context", "--device", "--json"]
    for command, flags in (("compress", compress_flags), ("eval", eval_flags)):
        text = run_cli(command, "--help").stdout
        for flag in flags:
            assert flag in text, f"{command} --help does not mention {flag}"
    assert "compress" in run_cli("--help").stdout


def test_console_script_and_module_are_the_same_program():
    script = BIN / "prunenet"
    assert script.exists(), "the prunenet console script is not installed"
    a = subprocess.run([script, "--version"], capture_output=True, text=True)
    b = run_cli("--version")
    assert a.returncode == 0 and a.stdout == b.stdout and "prunenet" in a.stdout


def test_compress_then_eval_with_json(tiny_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("compress", "--model", str(tiny_dir), "--ratio", "0.3", "--out", str(out), "--method", "prunenet",
                   "--episodes", "2",
                   "--json", "--quiet")  # fmt: skip
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ffn_width_after"] == 51 and summary["params_after"] < summary["params_before"]
    assert "FFN width" in proc.stdout and "time: training" in proc.stdout

    text = tmp_path / "text.txt"
    text.write_text(tiny_text(2000))
    proc = run_cli("eval", "--model", str(out), "--text-file", str(text), "--max-tokens", "300", "--context", "64",
                   "--json", "--quiet")  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 300 - 5  # 5 windows of 64/64/64/64/44 tokens: one unscored token each
    assert result["parameters"] == summary["params_after"]
    assert 1.0 < result["perplexity"] < 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["compress", "--ratio", "1.2", "--out", "{tmp}/o"], "--ratio: must be in [0, 1)"),
        (["compress", "--model", "{tmp}/nope", "--ratio", "0.2", "--out", "{tmp}/o"], "{tmp}/nope"),
        (["compress", "--model", "{model}", "--ratio", "0.2", "--out", "{model}"], "source model"),
        (["eval", "--model", "{model}", "--text-file", "{tmp}/missing.txt"], "missing.txt"),
    ],
    ids=["ratio", "missing-model", "out-is-source", "missing-text"],
)
def test_bad_input_exits_2_with_one_clear_line(tiny_dir, tmp_path, args, message):
    fill = {"tmp": str(tmp_path), "model": str(tiny_dir)}
    proc = run_cli(*[a.format(**fill) for a in args], check=False)
    assert proc.returncode == 2
    assert message.format(**fill) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_argparse_rejects_unknown_choices():
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["compress", "--ratio", "0.1", "--out", "x", "--method", "best"])
    assert err.value.code == 2


def test_main_returns_2_on_non_empty_out(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "file").write_text("x")
    code = main(["compress", "--model", str(tiny_dir), "--ratio", "0.1", "--out", str(out), "--quiet"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err


def test_triton_reward_backend_without_cuda_exits_2(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest enables the interpreter for the kernel tests
    args = ["compress", "--model", str(tiny_dir), "--ratio", "0.1", "--out", str(tmp_path / "o"), "--quiet"]
    code = main([*args, "--method", "prunenet", "--device", "cpu", "--reward-backend", "triton"])
    assert code == 2 and "--reward-backend" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_help_documents_evaluation_flags():
    text = run_cli("eval", "--help").stdout
    for flag in ["--stride", "--batch-size", "--tasks", "--tasks-dir", "--limit", "--no-perplexity", "--cost",
                 "--cost-prompt-tokens", "--cost-new-tokens", "--cost-repeats", "--baseline", "--quiet"]:  # fmt: skip
        assert flag in text, f"eval --help does not mention {flag}"


def test_eval_baseline_tasks_and_cost_side_by_side(tiny_dir, tmp_path, capsys):
    """One `eval` with every measurement on a pruned tiny model against its dense source."""
    out = tmp_path / "pruned"
    assert main(["compress", "--model", str(tiny_dir), "--ratio", "0.3", "--out", str(out), "--method", "prunenet",
                 "--episodes", "1",
                 "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    text = tmp_path / "text.txt"
    text.write_text(tiny_text(2000))
    tasks_dir = Path(__file__).parent / "data" / "lm_eval_tasks"
    args = ["eval", "--model", str(out), "--baseline", str(tiny_dir), "--text-file", str(text), "--max-tokens", "200",
            "--context", "64", "--stride", "32", "--cost", "--cost-prompt-tokens", "8", "--cost-new-tokens", "2",
            "--cost-repeats", "1", "--json", "--quiet"]  # fmt: skip
    if importlib.util.find_spec("lm_eval"):
        args += ["--tasks", "prunenet_tiny_mc", "--tasks-dir", str(tasks_dir)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    base = result["baseline"]
    assert result["tokens"] == base["tokens"] == 199 and result["stride"] == 32
    assert result["cost"]["parameters"] == result["parameters"] < base["parameters"] == base["cost"]["parameters"]
    assert result["cost"]["weight_bytes"] < base["cost"]["weight_bytes"]
    assert "model/baseline" in printed and "decode tokens/s" in printed and "peak memory (MiB)" in printed
    ratio_line = next(line for line in printed.splitlines() if line.startswith("parameters"))
    assert f"{result['parameters'] / base['parameters']:.3f}" in ratio_line
    if importlib.util.find_spec("lm_eval"):
        assert "prunenet_tiny_mc acc_norm (%)" in printed and "zero_shot" in base


@pytest.mark.parametrize(
    "args, message",
    [
        (["--no-perplexity"], "nothing to measure"),
        (["--stride", "1000"], "--stride"),
        (["--cost", "--no-perplexity", "--cost-repeats", "0"], "--cost-repeats must be at least 1"),
    ],
    ids=["nothing", "stride", "cost-repeats"],
)
def test_eval_bad_input_exits_2(tiny_dir, tmp_path, capsys, args, message):
    text = tmp_path / "text.txt"
    text.write_text(tiny_text(500))
    assert main(["eval", "--model", str(tiny_dir), "--text-file", str(text), "--quiet", *args]) == 2
    assert message in capsys.readouterr().err


def test_eval_tasks_without_reachable_datasets_exits_2_saying_why(tiny_dir, tmp_path, capsys):
    """The paper's tasks need the Hub; offline (as in these tests) the command says so and how to work around it."""
    pytest.importorskip("lm_eval")
    code = main(["eval", "--model", str(tiny_dir), "--tasks", "piqa", "--no-perplexity", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "piqa" in err and "--tasks-dir" in err and "HF_DATASETS_CACHE" in err
