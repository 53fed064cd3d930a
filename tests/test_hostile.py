"""Hostile-but-realistic input: every bad value, path and situation ends with exit code 2 (130/143 for
signals) and one line, writes nothing and deletes nothing that prunenet did not write.

``BAD_INPUTS`` is the table future flags extend: the arguments (with ``{placeholders}`` for the inputs
below) and a fragment of the one error line.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from running import cli_command, compress_quietly, run_cli
from safetensors.torch import load_file, save_file
from tiny_models import WIDTH, save_tiny_model, tiny_text
from untouched import error_line, leftovers, refused, snapshot

import prunenet.models as models
import prunenet.pipeline as pipeline
import prunenet.sources as sources
from prunenet.cache import cache_dir
from prunenet.checkpoint import MANIFEST_FILE
from prunenet.cli import main
from prunenet.output import OutputFolderError, claim_output, lock_path

HIDDEN = 32
LONG_RUN = ["--method", "prunenet", "--episodes", "200000"]  # a compress of the tiny model that runs until stopped


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Read-only inputs: a tiny model, damaged variants of it, policies, a text, bad links."""
    root = tmp_path_factory.mktemp("inputs")
    save_tiny_model("llama", root / "model")
    shutil.copytree(root / "model", root / "nan-model")
    weights = load_file(root / "nan-model" / "model.safetensors")
    weights["model.layers.1.mlp.gate_proj.weight"][3, 5] = float("nan")
    save_file(weights, root / "nan-model" / "model.safetensors", metadata={"format": "pt"})
    (root / "config-only").mkdir()
    shutil.copy(root / "model" / "config.json", root / "config-only")
    ok = {
        "proj.weight": torch.zeros(WIDTH, HIDDEN),
        "proj.bias": torch.zeros(WIDTH),
        "row_weights": torch.ones(WIDTH, 1),
    }
    save_file({**ok, "row_weights": torch.ones(5)}, root / "bad-shapes.safetensors")
    save_file({**ok, "proj.weight": torch.full((WIDTH, HIDDEN), float("nan"))}, root / "nan-policy.safetensors")
    save_file({"something": torch.zeros(3)}, root / "not-a-policy.safetensors")
    save_file({name: t.long() for name, t in ok.items()}, root / "int64-policy.safetensors")
    save_file({name: t.bool() for name, t in ok.items()}, root / "bool-policy.safetensors")
    os.mkfifo(root / "fifo")
    for name in ("fifo-model", "zero-model", "other-width-model"):
        shutil.copytree(root / "model", root / name)
    os.unlink(root / "fifo-model" / "model.safetensors")
    os.mkfifo(root / "fifo-model" / "model.safetensors")
    os.unlink(root / "zero-model" / "model.safetensors")
    os.symlink("/dev/zero", root / "zero-model" / "model.safetensors")
    config = json.loads((root / "other-width-model" / "config.json").read_text())
    (root / "other-width-model" / "config.json").write_text(json.dumps({**config, "intermediate_size": WIDTH + 3}))
    (root / "text.txt").write_text(tiny_text(800))
    (root / "a-file").write_text("not a folder")
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    os.symlink("missing-target", root / "dangling")
    os.symlink("model", root / "link-to-model")
    return root


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """The current folder of a run, with a user's file in it; HOME and the cache are redirected here too."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "thesis.tex").write_text("\\documentclass{article} years of work")
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache" / "prunenet"))
    (tmp_path / "cache" / "prunenet" / "smollm2-135m").mkdir(parents=True)
    (tmp_path / "cache" / "prunenet" / "smollm2-135m" / "model.safetensors").write_bytes(b"cached weights")
    (folder / "foreign").mkdir()
    (folder / "foreign" / "data.csv").write_text("a,b\n1,2\n")
    return folder


C = ["compress", "--model", "{inputs}/model", "--ratio", "0.5", "--method", "random", "--quiet"]
CP = ["compress", "--model", "{inputs}/model", "--ratio", "0.5", "--quiet", "--method", "prunenet", "--episodes", "1"]
E = ["eval", "--model", "{inputs}/model", "--text-file", "{inputs}/text.txt", "--quiet"]
F = ["finetune", "--model", "{inputs}/model", "--out", "ft", "--quiet"]

BAD_INPUTS = [
    # output paths
    pytest.param([*C, "--out", ""], "--out is empty", id="out-empty"),
    pytest.param([*C, "--out", "  "], "--out is empty", id="out-blank"),
    pytest.param([*C, "--out", ".", "--overwrite"], "is the current folder", id="out-cwd"),
    pytest.param([*C, "--out", "..", "--overwrite"], "is a parent of the current folder", id="out-cwd-parent"),
    pytest.param([*C, "--out", "/", "--overwrite"], "is the root folder", id="out-root"),
    pytest.param([*C, "--out", "{tmp}/home", "--overwrite"], "is your home folder", id="out-home"),
    pytest.param([*C, "--out", "~", "--overwrite"], "is your home folder", id="out-home-tilde"),
    pytest.param([*C, "--out", "{inputs}/model", "--overwrite"], "is the source model", id="out-is-source"),
    pytest.param([*C, "--out", "{inputs}/model/sub"], "lies inside the source model", id="out-in-source"),
    pytest.param([*C, "--out", "{inputs}", "--overwrite"], "contains the source model", id="out-holds-source"),
    pytest.param([*C, "--out", "{tmp}/cache", "--overwrite"], "contains prunenet's model cache", id="out-holds-cache"),
    pytest.param([*C, "--out", "{tmp}/cache/prunenet", "--overwrite"], "is prunenet's model cache", id="out-is-cache"),
    pytest.param([*C, "--out", "{tmp}/cache/prunenet/x"], "lies inside prunenet's model cache", id="out-in-cache"),
    pytest.param([*C, "--out", "foreign"], "data.csv, which prunenet did not write", id="out-foreign"),
    pytest.param(
        [*C, "--out", "foreign", "--overwrite"], "data.csv, which prunenet did not write", id="out-foreign-overwrite"
    ),  # fmt: skip
    pytest.param([*C, "--out", "thesis.tex", "--overwrite"], "exists and is not a folder", id="out-is-a-file"),
    pytest.param([*C, "--out", "missing/out"], "parent folder of --out does not exist", id="out-no-parent"),
    pytest.param([*C, "--out", "{inputs}/a-file/out"], "parent folder of --out does not exist", id="out-parent-file"),
    pytest.param(
        [*C, "--out", "{inputs}/link-to-model", "--overwrite"], "is the source model", id="out-links-to-source"
    ),  # fmt: skip
    pytest.param([*C, "--out", "{inputs}/loop-a"], "loop-a is a loop of symbolic links", id="out-loop"),
    pytest.param([*C, "--out", "x" * 240], "the name of --out is too long: 240 bytes", id="out-name-too-long"),
    pytest.param([*F, "--out", "{inputs}/model"], "is the source model", id="finetune-out-is-source"),
    pytest.param(
        [*F, "--teacher", "{inputs}/nan-model", "--out", "{inputs}/nan-model"],
        "is the teacher model",
        id="finetune-out-is-teacher",
    ),  # fmt: skip
    pytest.param([*F, "--out", "{inputs}", "--overwrite"], "contains the source model", id="finetune-out-holds-source"),
    # numbers
    pytest.param([*CP, "--out", "o", "--episodes", "0"], "--episodes must be at least 1", id="episodes-0"),
    pytest.param(
        [*CP, "--out", "o", "--episodes", "99999999999999999999"], "--episodes must be at most", id="episodes-huge"
    ),  # fmt: skip
    pytest.param([*CP, "--out", "o", "--episodes", "many"], "invalid int value", id="episodes-word"),
    pytest.param([*C, "--out", "o", "--max-memory", "1e400GiB"], "not a finite size", id="max-memory-inf"),
    pytest.param([*C, "--out", "o", "--max-memory", "0"], "must be positive", id="max-memory-0"),
    pytest.param([*C, "--out", "o", "--max-memory", "lots"], "cannot read 'lots' as a size", id="max-memory-word"),
    pytest.param([*CP, "--out", "o", "--kl", "nan"], "--kl must be a finite number", id="kl-nan"),
    pytest.param([*CP, "--out", "o", "--kl", "-1"], "--kl must be at least 0", id="kl-negative"),
    pytest.param([*CP, "--out", "o", "--lr", "inf"], "--lr must be a finite number", id="lr-inf"),
    pytest.param([*CP, "--out", "o", "--lr", "0"], "--lr must be positive", id="lr-0"),
    pytest.param([*C, "--out", "o", "--seed", "-1"], "--seed must be at least 0", id="seed-negative"),
    pytest.param([*C, "--out", "o", "--seed", "12345678901234567890123"], "--seed must be at most", id="seed-huge"),
    pytest.param([*C, "--out", "o", "--ratio", "nan"], "--ratio: must be in [0, 1)", id="ratio-nan"),
    pytest.param([*C, "--out", "o", "--ratio", "1"], "--ratio: must be in [0, 1)", id="ratio-1"),
    pytest.param(
        [*C, "--out", "o", "--method", "selfcal", "--probe-length", "1"],
        "--probe-length must be at least 2",
        id="probe-length-1",
    ),  # fmt: skip
    pytest.param(
        [*C, "--out", "o", "--method", "selfcal", "--probe-sequences", "0"],
        "--probe-sequences must be at least 1",
        id="probe-sequences-0",
    ),  # fmt: skip
    pytest.param(
        [*C, "--out", "o", "--method", "selfcal", "--streaming", "--max-memory", "64MiB"],
        "cannot run this model one block at a time",
        id="selfcal-budget-below-one-block",
    ),  # fmt: skip
    pytest.param(
        [*C, "--out", "o", "--model", "{inputs}/nan-model", "--method", "selfcal"],
        "NaN or infinite",
        id="weights-nan-selfcal",
    ),  # fmt: skip
    pytest.param(
        [*C, "--out", "o", "--model", "{inputs}/nan-model", "--method", "selfcal", "--streaming"],
        "NaN or infinite",
        id="weights-nan-selfcal-streaming",
    ),  # fmt: skip
    pytest.param([*E, "--text-file", "/dev/zero"], "/dev/zero is not a regular file", id="eval-text-dev-zero"),
    pytest.param([*E, "--text-file", "{inputs}/fifo"], "fifo is not a regular file", id="eval-text-fifo"),
    pytest.param([*E, "--max-tokens", "0"], "--max-tokens must be at least 1", id="eval-max-tokens-0"),
    pytest.param([*E, "--max-tokens", "-5"], "--max-tokens must be at least 1", id="eval-max-tokens-negative"),
    pytest.param([*E, "--context", "1"], "--context must be at least 2", id="eval-context-1"),
    pytest.param([*E, "--stride", "0"], "--stride must be at least 1", id="eval-stride-0"),
    pytest.param([*E, "--batch-size", "0"], "--batch-size must be at least 1", id="eval-batch-0"),
    pytest.param([*E, "--limit", "0"], "--limit must be at least 1", id="eval-limit-0"),
    pytest.param(
        [*E, "--cost", "--cost-new-tokens", "0"], "--cost-new-tokens must be at least 1", id="eval-cost-new-tokens-0"
    ),  # fmt: skip
    pytest.param([*F, "--steps", "0"], "--steps must be at least 1", id="finetune-steps-0"),
    pytest.param([*F, "--seed", "-3"], "--seed must be at least 0", id="finetune-seed-negative"),
    pytest.param([*F, "--lr", "nan"], "--lr must be a finite number", id="finetune-lr-nan"),
    pytest.param([*F, "--eval-tokens", "-1"], "--eval-tokens must be at least 0", id="finetune-eval-tokens"),
    # devices
    pytest.param([*C, "--out", "o", "--device", "bogus"], "--device 'bogus' is not a device", id="device-bogus"),
    pytest.param([*C, "--out", "o", "--device", "cuda:99"], "--device cuda:99", id="device-cuda-99"),
    pytest.param([*E, "--device", "bogus"], "--device 'bogus' is not a device", id="eval-device-bogus"),
    pytest.param([*F, "--device", "bogus"], "--device 'bogus' is not a device", id="finetune-device-bogus"),
    # models and policies
    pytest.param([*C, "--out", "o", "--model", "{inputs}/loop-a"], "loop of symbolic links", id="model-link-loop"),
    pytest.param([*C, "--out", "o", "--model", "{inputs}/dangling"], "broken symbolic link", id="model-dangling"),
    pytest.param(
        [*C, "--out", "o", "--model", "{inputs}/config-only"],
        "has a config.json but no weights",
        id="model-config-only",
    ),  # fmt: skip
    pytest.param([*CP, "--out", "o", "--model", "{inputs}/nan-model"], "NaN or infinite", id="weights-nan"),
    pytest.param([*E, "--model", "{inputs}/nan-model"], "NaN or infinite", id="eval-weights-nan"),
    pytest.param([*F, "--model", "{inputs}/nan-model"], "NaN or infinite", id="finetune-weights-nan"),
    pytest.param(
        [*C, "--out", "o", "--model", "{inputs}/fifo-model"],
        "fifo-model/model.safetensors is not a regular file",
        id="weights-fifo",
    ),  # fmt: skip
    pytest.param(
        [*C, "--out", "o", "--model", "{inputs}/zero-model"],
        "zero-model/model.safetensors is not a regular file",
        id="weights-dev-zero",
    ),  # fmt: skip
    pytest.param(
        [*CP, "--out", "o", "--model", "{inputs}/nan-model", "--streaming"],
        "NaN or infinite",
        id="weights-nan-streaming",
    ),  # fmt: skip
    pytest.param(
        [*CP, "--out", "o", "--policy", "{inputs}/bad-shapes.safetensors"],
        "is damaged: its tensors",
        id="policy-shapes",
    ),  # fmt: skip
    pytest.param(
        [*CP, "--out", "o", "--policy", "{inputs}/nan-policy.safetensors"], "NaN or infinite", id="policy-nan"
    ),  # fmt: skip
    pytest.param(
        [*CP, "--out", "o", "--policy", "{inputs}/int64-policy.safetensors"],
        "its tensors are int64, not floating point",
        id="policy-int64",
    ),  # fmt: skip
    pytest.param(
        [*CP, "--out", "o", "--policy", "{inputs}/bool-policy.safetensors"],
        "its tensors are bool, not floating point",
        id="policy-bool",
    ),  # fmt: skip
    pytest.param(
        [*CP, "--out", "o", "--policy", "{inputs}/not-a-policy.safetensors"],
        "is not a PruneNet policy",
        id="policy-foreign",
    ),  # fmt: skip
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(inputs, work, tmp_path, capsys, argv, message):
    if "cuda:99" in argv and torch.cuda.device_count() > 99:  # pragma: no cover
        pytest.skip("this machine has 100 GPUs")
    argv = [a.format(inputs=inputs, tmp=tmp_path) for a in argv]
    assert message in refused(argv, capsys, inputs, tmp_path)


def test_cuda_on_a_cpu_only_torch_is_one_line(inputs, work, capsys):
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    assert main([*(a.format(inputs=inputs) for a in C), "--out", "o", "--device", "cuda"]) == 2
    assert "CPU-only build" in error_line(capsys.readouterr().err)


def test_overwrite_never_deletes_a_source_model_inside_out(inputs, tmp_path, monkeypatch, capsys):
    """The reproducer: `--out par --overwrite` where par/model is the model being pruned."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(inputs / "model", tmp_path / "par" / "model")
    before = snapshot(tmp_path / "par")
    code = main(["compress", "--model", "par/model", "--ratio", "0.5", "--out", "par", "--method", "random",
                 "--overwrite", "--quiet"])  # fmt: skip
    assert code == 2 and "contains the source model" in error_line(capsys.readouterr().err)
    assert snapshot(tmp_path / "par") == before


# These runs test the output folder and the refusals, which the selection does not change: a random
# selection trains no policy, so each run is quick.
run = functools.partial(compress_quietly, ratio=0.5, method="random")


def test_overwrite_replaces_only_what_prunenet_wrote(inputs, tmp_path):
    out = tmp_path / "out"
    run(inputs / "model", out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["files"] == sorted(p.name for p in out.iterdir())
    run(inputs / "model", out, ratio=0.25, overwrite=True)  # our own output: replaced
    assert json.loads((out / MANIFEST_FILE).read_text())["ratio"] == 0.25

    (out / "notes.md").write_text("my notes")  # a user's file in it: the folder is no longer ours alone
    with pytest.raises(OutputFolderError, match="notes.md, which prunenet did not write"):
        run(inputs / "model", out, overwrite=True)
    assert (out / "notes.md").read_text() == "my notes"
    (out / "notes.md").unlink()

    (out / "model.safetensors").unlink()  # a listed file the user removed: still ours
    (out / "model.safetensors").mkdir()  # ... but a folder in its place is not
    with pytest.raises(OutputFolderError, match="model.safetensors, which prunenet did not write"):
        run(inputs / "model", out, overwrite=True)
    (out / "model.safetensors").rmdir()

    listed = json.loads((out / MANIFEST_FILE).read_text())
    del listed["files"]  # an older manifest that lists no files: not recognised
    (out / MANIFEST_FILE).write_text(json.dumps(listed))
    with pytest.raises(OutputFolderError, match="lists no files"):
        run(inputs / "model", out, overwrite=True)
    assert leftovers(tmp_path) == []


def test_files_added_to_out_during_the_run_are_not_deleted(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real = pipeline.write_manifest

    def user_writes_meanwhile(folder, manifest):
        (out / "arrived-meanwhile.txt").write_text("keep")
        real(folder, manifest)

    monkeypatch.setattr(pipeline, "write_manifest", user_writes_meanwhile)
    with pytest.raises(OutputFolderError, match="arrived-meanwhile.txt"):
        run(inputs / "model", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["arrived-meanwhile.txt"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_a_second_run_on_the_same_out_is_refused_at_once(inputs, tmp_path, monkeypatch, streaming):
    out = tmp_path / "out"
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("did work"))
    monkeypatch.setattr(sources, "CheckpointStates", lambda *a, **k: pytest.fail("did work"))
    with claim_output(out):  # the first run
        for overwrite in (False, True):
            with pytest.raises(OutputFolderError, match=r"another prunenet run \(pid \d+ .*\) is writing --out"):
                run(inputs / "model", out, streaming=streaming, overwrite=overwrite)
    assert leftovers(tmp_path) == [] and not out.exists()


def cli_process(*args, cwd) -> subprocess.Popen:
    """The CLI started and left running, for a test to signal or kill while it works (running.run_cli
    waits for the end). SIGINT as a terminal would deliver it, even if this test runs in a job whose
    SIGINT is ignored."""
    return subprocess.Popen(
        cli_command(*args),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_killed_run_leaves_no_lock_that_blocks_and_no_orphan_that_survives(inputs, tmp_path, capsys):
    """A live run blocks a second one; after kill -9 its lock is stale and its partial folder an orphan:
    the next run takes the lock over and removes the orphan."""
    out = tmp_path / "out"
    first = cli_process("compress", "--model", str(inputs / "model"), "--ratio", "0.5", "--out", str(out),
                        *LONG_RUN, cwd=tmp_path)  # fmt: skip
    try:
        wait_for(lock_path(out), first)
        assert main(["compress", "--model", str(inputs / "model"), "--ratio", "0.5", "--out", str(out),
                     "--method", "random", "--quiet"]) == 2  # fmt: skip
        assert f"(pid {first.pid} " in error_line(capsys.readouterr().err)
    finally:
        first.kill()
        first.communicate()
    # What a run killed while saving leaves: its marked temporary folder (made the way the writer makes it).
    orphan = tmp_path / ".out.partial-0badc0de"
    orphan.mkdir()
    (orphan / ".prunenet-partial").touch()
    (orphan / "model.safetensors").write_bytes(b"half")
    assert lock_path(out).exists()  # the dead run's lock file stays; its flock died with it
    run(inputs / "model", out)
    assert leftovers(tmp_path) == [] and (out / MANIFEST_FILE).is_file()


def test_an_unmarked_lookalike_folder_is_never_removed(inputs, tmp_path):
    lookalike = tmp_path / ".out.partial-mine"
    lookalike.mkdir()
    (lookalike / "precious").write_text("not prunenet's")
    run(inputs / "model", tmp_path / "out")
    assert (lookalike / "precious").read_text() == "not prunenet's"


def test_kill_9_while_saving_leaves_an_orphan_the_next_run_removes(inputs, tmp_path):
    script = (
        "import os, signal, prunenet.pipeline as p\n"
        "p.save_policy = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from prunenet.cli import main\n"
        f"main(['compress', '--model', {str(inputs / 'model')!r}, '--ratio', '0.5', '--out', 'out', "
        "'--method', 'prunenet', '--episodes', '1', '--quiet'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert any(name.startswith(".out.partial-") for name in leftovers(tmp_path))
    run(inputs / "model", tmp_path / "out")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "sig, word", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")], ids=["int", "term"]
)
def test_signals_end_with_one_line_and_no_partial_output(inputs, tmp_path, sig, word):
    """The process cleans up, says so in one line, then ends by the same signal (a shell reports 130/143)."""
    out = tmp_path / "out"
    proc = cli_process("compress", "--model", str(inputs / "model"), "--ratio", "0.5", "--out", str(out),
                       *LONG_RUN, cwd=tmp_path)  # fmt: skip
    try:
        wait_for(lock_path(out), proc)
        time.sleep(1.0)  # into the work
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:  # a failed wait must not leave a run training for hours
        proc.kill()
    assert proc.returncode == -sig
    assert error_line(stderr) == f"prunenet compress: {word} (no partial output is left behind)"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["int", "term"])
@pytest.mark.parametrize("finalizer", ["del", "weakref"], ids=["__del__", "weakref.finalize"])
def test_a_signal_that_lands_in_a_finalizer_still_stops_the_run(tmp_path, sig, finalizer):
    """Raised inside a finalizer (a ``__del__``, a ``weakref.finalize`` callback), the exception would be printed
    and dropped, and the run go on to its end."""
    slow = (
        f"    os.kill(os.getpid(), {int(sig)})  # the handler runs in here\n"
        "    start = time.monotonic()\n"
        "    while time.monotonic() - start < 0.3:\n"
        "        pass\n"
    )
    script = (
        "import os, sys, time, weakref, prunenet.cli as cli\n"
        "def slow(*_):\n" + slow + "class Slow:\n"
        "    def __del__(self):\n"
        "        slow()\n"
        "class Plain:\n"
        "    pass\n"
        "def work(args):\n"
        + (
            "    Slow()  # freed at once: its finalizer runs on this line\n"
            if finalizer == "del"
            else "    weakref.finalize(Plain(), slow)  # called at once: its object is freed on this line\n"
        )
        + "    time.sleep(20)\n"
        "    print('ran to the end', file=sys.stderr)\n"
        "cli._run_compress = work\n"
        "sys.exit(cli.main(['compress', '--model', 'm', '--ratio', '0.5', '--out', 'out']))\n"
    )
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    word, code = ("interrupted", 130) if sig == signal.SIGINT else ("terminated", 143)
    assert proc.returncode == code, proc.stderr
    assert error_line(proc.stderr) == f"prunenet compress: {word} (no partial output is left behind)"
    assert time.monotonic() - started < 15


# -- file systems (tmpfs mounts need root; skipped elsewhere) ------------------------------------------------


@pytest.fixture
def mount(tmp_path):
    """``mount(name, size, read_only=False)``: a fresh tmpfs at ``tmp_path/name``, unmounted afterwards."""
    mounted = []

    def make(name: str, size: str = "1m", read_only: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def cli_error(argv, capsys) -> str:
    code = main(argv)
    line = error_line(capsys.readouterr().err)
    assert code == 2, line
    return line


def test_a_mount_point_as_out_is_refused_before_any_work(inputs, mount, monkeypatch, capsys):
    point = mount("mnt")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("did work"))
    line = cli_error([*(a.format(inputs=inputs) for a in C), "--out", str(point)], capsys)
    assert "is a mount point" in line and f"{point}/pruned" in line
    assert leftovers(point.parent, "mnt") == [] and list(point.iterdir()) == []


def test_a_read_only_parent_is_refused_before_any_work(inputs, mount, monkeypatch, capsys):
    parent = mount("ro", read_only=True)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("did work"))
    line = cli_error([*(a.format(inputs=inputs) for a in C), "--out", str(parent / "out")], capsys)
    assert "read-only" in line and "choose a writable --out" in line


def test_an_immutable_parent_is_refused_before_any_work(inputs, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "frozen"
    parent.mkdir()
    if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and a file system that supports it)")
    try:
        monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("did work"))
        line = cli_error([*(a.format(inputs=inputs) for a in C), "--out", str(parent / "out")], capsys)
        assert "not permitted" in line
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)


def test_too_little_free_space_is_refused_before_any_work(inputs, mount, monkeypatch, capsys):
    parent = mount("small", size="16k")  # the pruned tiny model needs more than 40 KiB
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("did work"))
    line = cli_error([*(a.format(inputs=inputs) for a in C), "--out", str(parent / "out")], capsys)
    assert "not enough free space" in line and "KiB" in line
    assert list(parent.iterdir()) == []


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(inputs, mount, monkeypatch, capsys):
    """The early estimate is a lower bound: a disk that fills up during the write fails late, cleanly."""
    parent = mount("full", size="96k")  # above the estimate (84 KiB of tensors), below the whole output
    line = cli_error([*(a.format(inputs=inputs) for a in C), "--out", str(parent / "out")], capsys)
    assert "no space left on the device" in line
    assert list(parent.iterdir()) == []


# -- strict JSON and permissions ---------------------------------------------------------------------------


def test_eval_json_is_strict_json_when_a_value_is_not_finite(inputs, monkeypatch, capsys, caplog):
    import prunenet.evaluate as evaluate

    real = evaluate.perplexity

    def diverged(*args, **kwargs):
        return {**real(*args, **kwargs), "perplexity": float("inf"), "nll": float("nan")}

    monkeypatch.setattr(evaluate, "perplexity", diverged)
    argv = [a.format(inputs=inputs) for a in E]
    assert main([*argv, "--max-tokens", "100", "--context", "32", "--json"]) == 0
    captured = capsys.readouterr()

    def reject(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    result = json.loads(captured.out.strip().splitlines()[-1], parse_constant=reject)
    assert result["perplexity"] is None and result["nll"] is None and result["tokens"] > 0
    assert "--json: not finite, printed as null: perplexity, nll" in caplog.text


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["022", "002"])
@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_output_permissions_follow_the_umask(inputs, tmp_path, umask, streaming):
    previous = os.umask(umask)
    try:
        run(inputs / "model", tmp_path / "out", method="prunenet", episodes=1, streaming=streaming)
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "policy.safetensors" in modes and "model.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_main_returns_the_signal_status_to_python_callers(inputs, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_model", interrupted)
    argv = ["compress", "--model", str(inputs / "model"), "--ratio", "0.5", "--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 130
    assert error_line(capsys.readouterr().err) == "prunenet compress: interrupted (no partial output is left behind)"
    assert list(tmp_path.iterdir()) == []


def test_overwrite_help_says_what_it_deletes(capsys):
    for command in ("compress", "finetune"):
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "only a folder prunenet wrote" in text and "never deletes anything else" in text


# -- files beside --out that prunenet did not make -------------------------------------------------


def _plant_link(lock: Path) -> None:
    (lock.parent / "victim.txt").write_text("victim")
    os.symlink("victim.txt", lock)


PLANTED = {  # what a user (or another user, in a shared folder) left under the lock's name
    "link": _plant_link,
    "file": lambda lock: lock.write_text("notes"),
    "empty-file": lambda lock: lock.touch(),
    "folder": lambda lock: lock.mkdir(),
    "fifo": lambda lock: os.mkfifo(lock),
}


@pytest.mark.parametrize("kind", PLANTED)
def test_an_entry_named_like_the_lock_is_refused_and_never_touched(inputs, tmp_path, capsys, kind):
    monkeypatch_cwd = tmp_path / "shared"
    monkeypatch_cwd.mkdir()
    PLANTED[kind](lock_path(monkeypatch_cwd / "out"))
    before = snapshot(monkeypatch_cwd)
    victim = {p: p.read_text() for p in monkeypatch_cwd.iterdir() if p.is_file() and not p.is_symlink()}
    code = main([a.format(inputs=inputs) for a in C] + ["--out", str(monkeypatch_cwd / "out")])
    line = error_line(capsys.readouterr().err)
    assert code == 2 and f"{lock_path(monkeypatch_cwd / 'out')} is in the way" in line, line
    assert snapshot(monkeypatch_cwd) == before
    assert {p: p.read_text() for p in victim} == victim


def test_a_stale_lock_is_taken_over_and_removed(inputs, tmp_path):
    """A lock file in prunenet's own format whose holder has died (its flock is gone) is prunenet's."""
    out = tmp_path / "out"
    lock_path(out).write_text("pid 4194999 on elsewhere since 2026-01-01T00:00:00\n")
    run(inputs / "model", out)
    assert (out / MANIFEST_FILE).is_file() and not lock_path(out).exists()


SIBLINGS = [  # the live temporary folders of runs on other outputs whose names start like .out.*
    ".out.old-1.partial-0123abcd",
    ".out.partial-X.partial-0123abcd",
    ".out.stage-1.stage-0123abcd",
    ".out.partial-0123abcd0",
]


def test_clean_up_takes_only_this_outputs_leftovers(inputs, tmp_path):
    """Leftovers are matched by their whole name: the marked folders of runs on --out out.old-1 and the
    like stay; a marked leftover of this output is removed."""
    for name in [*SIBLINGS, ".out.partial-0badc0de"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / ".prunenet-partial").touch()
        (tmp_path / name / "model.safetensors").write_bytes(b"in progress")
    run(inputs / "model", tmp_path / "out")
    assert sorted(leftovers(tmp_path)) == sorted(SIBLINGS)


@pytest.mark.parametrize("kind", ["folder", "link"])
def test_a_resume_folder_prunenet_did_not_make_is_refused(tmp_path, kind):
    from prunenet.output import partial_folder

    out = tmp_path / "out"
    resume = "0123456789abcdef"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "precious").write_text("mine")
    if kind == "folder":
        partial_folder(out, resume).mkdir()
        (partial_folder(out, resume) / "precious").write_text("mine")
    else:
        os.symlink(theirs, partial_folder(out, resume))
    before = snapshot(tmp_path)
    with claim_output(out) as target, pytest.raises(OutputFolderError, match="is in the way"):
        with target.write(resume=resume):
            pass
    assert snapshot(tmp_path) == before


def test_a_manifest_nested_too_deeply_is_not_prunenets(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000)
    before = snapshot(tmp_path)
    assert main([a.format(inputs=inputs) for a in C] + ["--out", str(out), "--overwrite"]) == 2
    assert "is not readable JSON" in error_line(capsys.readouterr().err)
    assert snapshot(tmp_path) == before


def test_an_empty_prunenet_cache_variable_means_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PRUNENET_CACHE", "")
    assert cache_dir() == tmp_path / ".cache" / "prunenet"


@pytest.mark.parametrize("module", ["torch", "torch.nn.functional"])
@pytest.mark.parametrize(
    "sig, word", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")], ids=["int", "term"]
)
def test_a_signal_while_torch_is_imported_is_one_line(inputs, tmp_path, module, sig, word):
    """The signal is sent from an import hook at the start of ``import MODULE``: start-up, where the handlers
    must already be in place (``import torch`` takes about a second)."""
    script = (
        "import importlib.abc, os, sys\n"
        "class Stop(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name == {module!r}:\n"
        "            sys.meta_path.remove(self)\n"
        f"            os.kill(os.getpid(), {int(sig)})\n"
        "sys.meta_path.insert(0, Stop())\n"
        "from prunenet.cli import entry\n"
        "assert 'torch' not in sys.modules\n"
        f"sys.argv = ['prunenet', 'compress', '--model', {str(inputs / 'model')!r}, '--ratio', '0.5', '--out', 'out',"
        " '--method', 'random', '--quiet']\n"
        "entry()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    assert proc.returncode == -sig, proc.stderr
    assert error_line(proc.stderr) == f"prunenet compress: {word} (no partial output is left behind)"
    assert "FakeTensor" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_write_never_writes_through_a_link_left_in_it(tmp_path):
    """A marked partial folder is prunenet's, but a link inside it (to a file outside) is dropped, not followed."""
    from prunenet.output import partial_folder

    out, resume = tmp_path / "out", "0123456789abcdef"
    (tmp_path / "victim.txt").write_text("victim")
    partial_folder(out, resume).mkdir()
    (partial_folder(out, resume) / ".prunenet-partial").touch()
    (partial_folder(out, resume) / "model-00001-of-00002.safetensors").write_bytes(b"a finished shard")
    os.symlink(tmp_path / "victim.txt", partial_folder(out, resume) / "model.safetensors")
    with claim_output(out) as target, pytest.raises(KeyboardInterrupt), target.write(resume=resume) as tmp:
        assert sorted(p.name for p in tmp.iterdir()) == [".prunenet-partial", "model-00001-of-00002.safetensors"]
        (tmp / "model.safetensors").write_bytes(b"new weights")
        raise KeyboardInterrupt
    assert (tmp_path / "victim.txt").read_text() == "victim"


def test_unreadable_weights_are_said_to_be_unreadable_not_corrupt(inputs, work, monkeypatch, capsys):
    import prunenet.streaming as streaming

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(streaming, "read_header", denied)  # root reads a file of mode 000: denied by hand
    assert main([a.format(inputs=inputs) for a in C] + ["--out", "o"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "cannot be read: cannot read" in line and "permission denied" in line and "corrupt" not in line


def test_weights_of_other_shapes_than_the_config_are_one_line_naming_the_tensor(inputs, tmp_path):
    """transformers prints a table and raises "look at the above report!": the table is held back, its first
    row becomes the one line. In a process of its own: the table goes to the stderr transformers found there."""
    argv = [a.format(inputs=inputs) for a in E] + ["--model", str(inputs / "other-width-model")]
    proc = run_cli(*argv, check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    shapes = re.search(r"mlp\.\w+\.weight is \((\d+), (\d+)\) in the checkpoint, but its config.json makes it "
                       r"\((\d+), (\d+)\)", line)  # fmt: skip
    assert shapes is not None, line
    assert sorted(map(int, shapes.groups())) == sorted([HIDDEN, WIDTH, HIDDEN, WIDTH + 3])
    assert "above report" not in line
