"""The command line as users script against it: both entry points, --help, exit codes, --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny_model, tiny_text

from prunenet.cli import build_parser, main

BIN = Path(sys.executable).parent


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "prunenet", *args], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-phi"
    save_tiny_model("phi", folder)
    return folder


def test_help_documents_every_flag():
    compress_flags = ["--model", "--ratio", "--out", "--method", "--episodes", "--policy", "--selection", "--seed",
                      "--device", "--dtype", "--overwrite", "--kl", "--json"]  # fmt: skip
    eval_flags = ["--model", "--text-file", "--max-tokens", "--context", "--device", "--json"]
    for command, flags in (("compress", compress_flags), ("eval", eval_flags)):
        text = cli(command, "--help").stdout
        for flag in flags:
            assert flag in text, f"{command} --help does not mention {flag}"
    assert "compress" in cli("--help").stdout


def test_console_script_and_module_are_the_same_program():
    script = BIN / "prunenet"
    assert script.exists(), "the prunenet console script is not installed"
    a = subprocess.run([script, "--version"], capture_output=True, text=True)
    b = cli("--version")
    assert a.returncode == 0 and a.stdout == b.stdout and "prunenet" in a.stdout


def test_compress_then_eval_with_json(tiny_dir, tmp_path):
    out = tmp_path / "out"
    proc = cli("compress", "--model", str(tiny_dir), "--ratio", "0.3", "--out", str(out), "--episodes", "2",
               "--json", "--quiet")  # fmt: skip
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ffn_width_after"] == 51 and summary["params_after"] < summary["params_before"]
    assert "FFN width" in proc.stdout and "time: training" in proc.stdout

    text = tmp_path / "text.txt"
    text.write_text(tiny_text(2000))
    proc = cli("eval", "--model", str(out), "--text-file", str(text), "--max-tokens", "300", "--context", "64",
               "--json", "--quiet")  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 300 - 5  # 5 windows of 64/64/64/64/44 tokens: one unscored token each
    assert result["parameters"] == summary["params_after"]
    assert 1.0 < result["perplexity"] < 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["compress", "--ratio", "1.2", "--out", "{tmp}/o"], "--ratio must be in [0, 1)"),
        (["compress", "--model", "{tmp}/nope", "--ratio", "0.2", "--out", "{tmp}/o"], "{tmp}/nope"),
        (["compress", "--model", "{model}", "--ratio", "0.2", "--out", "{model}"], "source model"),
        (["eval", "--model", "{model}", "--text-file", "{tmp}/missing.txt"], "missing.txt"),
    ],
    ids=["ratio", "missing-model", "out-is-source", "missing-text"],
)
def test_bad_input_exits_2_with_one_clear_line(tiny_dir, tmp_path, args, message):
    fill = {"tmp": str(tmp_path), "model": str(tiny_dir)}
    proc = cli(*[a.format(**fill) for a in args], check=False)
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


def test_offline_environment_is_set():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
