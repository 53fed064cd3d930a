"""One run of the check and how it runs a step: each command in a process group of its own, under the step's limit."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout: tools/gpucheck/ -> tools/ -> root
RESULT_TAG = "GPU-CHECK-RESULT "  # starts the JSON line steps.COMPRESS_WRAPPER prints
CARRY_HINT = "carry its wheel and pass --wheels DIR"


class Skip(Exception):
    """The step cannot run here; the message says why (and what would make it run)."""


class Failure(Exception):
    """The step ran and something was wrong; the message says what."""


class Interrupted(BaseException):
    """SIGTERM (a time limit around this script) or Ctrl-C: stop the running child, write the summary."""


def provenance():
    """benchmarks/provenance.py (the git revision, the CPU's name), which imports no torch, as this process must not."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import provenance as module

    return module


@dataclass
class Proc:
    """A finished child: exit status, seconds, whether it was stopped at its limit, its output."""

    rc: int
    seconds: float
    timed_out: bool
    output: str

    def last_line(self) -> str:
        lines = [line for line in self.output.strip().splitlines() if line.strip()]
        return lines[-1][-300:] if lines else "(no output)"

    def result(self) -> dict:
        """The JSON object a child printed after ``RESULT_TAG`` (empty if none)."""
        for line in reversed(self.output.splitlines()):
            if line.startswith(RESULT_TAG):
                return json.loads(line[len(RESULT_TAG) :])
        return {}


@dataclass
class StepResult:
    step: str
    status: str  # passed, failed, skipped, pending
    seconds: float = 0.0
    details: str = ""


@dataclass
class Check:
    """One run of the check: its options, folders, environment and what it has found so far."""

    args: argparse.Namespace
    out: Path
    work: Path
    log_path: Path
    info: dict
    missing: dict[str, str]  # module -> why it is missing
    env: dict[str, str] = field(default_factory=dict)
    results: list[StepResult] = field(default_factory=list)
    compress_rows: list[dict] = field(default_factory=list)
    built_module: Path | None = None
    deadline: float = float("inf")  # the whole run's (--budget)
    step_deadline: float = float("inf")
    child: subprocess.Popen | None = None
    temporary_work: bool = False  # a folder of its own (no --work): removed at the end unless --keep-work

    @classmethod
    def start(cls, args: argparse.Namespace, command: list[str], started: str) -> Check:
        """The --out and work folders made, steps.log begun with the command line; nothing probed yet."""
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        temporary = args.work is None
        work = Path(tempfile.mkdtemp(prefix="prunenet-gpu-check-")) if temporary else args.work.resolve()
        work.mkdir(parents=True, exist_ok=True)
        log_path = out / "steps.log"
        log_path.write_text(f"tools/gpu-check {shlex.join(command)}, {started}\n")
        return cls(args, out, work, log_path, {}, {}, temporary_work=temporary)

    @property
    def dry(self) -> bool:
        return self.args.dry_run

    @property
    def tag(self) -> str:
        return "cpu-dry-run" if self.dry else "cuda"

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    @property
    def python(self) -> str:
        return sys.executable

    def device_label(self) -> str:
        """The GPU's name, or the CPU's model name and torch's thread count."""
        if not self.dry and self.info.get("gpu_names"):
            return self.info["gpu_names"][0]
        return f"cpu: {provenance().cpu_model_name() or 'cpu'} ({self.info.get('threads', '?')} threads)"

    def log(self, text: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def run(self, cmd: list[str], env: dict[str, str] | None = None, shown: str | None = None) -> Proc:
        """Run ``cmd`` in the work folder, its output appended to steps.log, within the step's time left.

        The work folder, not the checkout, is the current folder: ``python -m`` puts it first on sys.path,
        and the checkout's prunenet/ there would shadow the overlay (and lack prunenet.kernels). The child
        gets a process group of its own, so that at the limit the whole group (bench workers, torchrun's
        ranks) is stopped: SIGTERM, then SIGKILL. ``shown``: the command as the console shows it.
        """
        left = min(self.step_deadline, self.deadline) - time.monotonic()
        if left < 1:
            raise Failure("no time left in the step's limit")
        self.log(f"\n$ {shlex.join(cmd)}   (limit {left:.0f} s)")
        print(f"  $ {(shown or shlex.join(cmd))[:200]}", flush=True)
        offset = self.log_path.stat().st_size
        tick = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.child = subprocess.Popen(
                cmd, cwd=self.work, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=os.setpgrp,
            )  # fmt: skip
            try:
                rc, timed_out = self.child.wait(timeout=left), False
            except subprocess.TimeoutExpired:
                stop_group(self.child)
                rc, timed_out = self.child.returncode, True
            finally:
                if self.child.poll() is None:  # interrupted while waiting
                    stop_group(self.child)
                self.child = None
        seconds = time.monotonic() - tick
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            output = f.read().decode("utf-8", "replace")
        verdict = f"stopped at the {left:.0f} s limit" if timed_out else f"exit {rc}"
        self.log(f"-> {verdict} after {seconds:.1f} s")
        print(f"    {verdict} after {seconds:.1f} s", flush=True)
        proc = Proc(rc, seconds, timed_out, output)
        if timed_out:
            raise Failure(f"timed out: {command_name(cmd)} ran past its {left:.0f} s")
        if rc != 0:
            tail = "\n".join(output.strip().splitlines()[-15:])
            print("    " + tail.replace("\n", "\n    "), flush=True)
        return proc

    def need(self, *modules: str) -> None:
        """Skip the step if a module it needs is missing."""
        absent = [m for m in modules if m in self.missing]
        if absent:
            raise Skip(f"needs {', '.join(absent)} ({CARRY_HINT})")

    def remove_work(self) -> None:
        """Remove the work folder if it is a temporary one and --keep-work was not given."""
        if self.temporary_work and not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)


def command_name(cmd: list[str]) -> str:
    """A short name for a command line: the script or module a ``python`` runs, else the program."""
    if len(cmd) > 2 and cmd[1] == "-m":
        return cmd[2]
    if len(cmd) > 1 and cmd[1] == "-c":
        return "python -c"
    if len(cmd) > 1 and cmd[1].endswith(".py"):
        return Path(cmd[1]).name
    return " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd[:2]))


def stop_group(child: subprocess.Popen) -> None:
    """SIGTERM to the child's process group, SIGKILL if it is still there 10 s later."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            pass
        try:
            child.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # Members of the group that outlived its leader (a rank, a bench worker) get the same treatment.
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_step(check: Check, step: str, function: Callable[[Check], str], limit: float) -> StepResult:
    """``function(check)`` under ``limit`` seconds (and the --budget left) as the result of ``step``: passed with
    its key numbers, skipped or failed with the reason. An interrupt is recorded as a failed step and goes on up;
    any other error is reported (its traceback in steps.log), so the next step still runs."""
    tick = time.monotonic()
    check.step_deadline = tick + limit
    try:
        if check.deadline - tick < 10:
            raise Skip(f"the --budget of {check.args.budget:.0f} s is spent")
        result = StepResult(step, "passed", details=function(check))
    except Skip as why:
        result = StepResult(step, "skipped", details=str(why))
    except Failure as why:
        result = StepResult(step, "failed", details=str(why))
    except (Interrupted, KeyboardInterrupt):  # the child is stopped already (Check.run)
        check.results.append(StepResult(step, "failed", time.monotonic() - tick, "interrupted"))
        raise
    except Exception as err:  # a bug in this script or a malformed result: report it, go on
        check.log(traceback.format_exc())
        result = StepResult(step, "failed", details=f"{type(err).__name__}: {err} (traceback in steps.log)")
    result.seconds = time.monotonic() - tick
    return result
