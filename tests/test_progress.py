"""Progress reports: bars at a terminal, a log line at least every 30 s into a log, nothing with --quiet."""

from __future__ import annotations

import io
import logging

import pytest
from tqdm.auto import tqdm

import prunenet.progress as progress
from prunenet.cli import main
from prunenet.progress import LogProgress, progress_bar


class Clock:
    """A clock that advances ``step`` seconds each time it is read."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "prunenet"]


def test_a_log_line_at_least_every_interval_with_the_count_rate_and_postfix(caplog):
    caplog.set_level(logging.INFO)
    bar = LogProgress(range(10), desc="fine-tuning", unit="step", interval=30, clock=Clock(10.0))
    for step in bar:
        bar.set_postfix(loss=f"{step:.1f}")
    # read at start (10 s), then once per step: 20, 30, ... 110 s; a line each time 30 s have passed since the last
    assert lines(caplog) == [
        "fine-tuning: 3/10 step (30%), 0.1 step/s, loss=2.0",
        "fine-tuning: 6/10 step (60%), 0.1 step/s, loss=5.0",
        "fine-tuning: 9/10 step (90%), 0.1 step/s, loss=8.0",
    ]


def test_short_work_adds_no_line(caplog):
    caplog.set_level(logging.INFO)
    for _ in LogProgress(range(100), desc="perplexity", clock=Clock(0.01)):
        pass
    assert lines(caplog) == []


def test_bytes_are_shown_as_sizes(caplog):
    caplog.set_level(logging.INFO)
    with LogProgress(desc="writing shards", unit="B", unit_scale=True, total=2**31, interval=1, clock=Clock(1)) as bar:
        bar.update(2**30)
    assert lines(caplog) == ["writing shards: 1.00 GiB of 2.00 GiB (50%), 1.00 GiB/s"]  # 1 s between start and update


class Stream(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.mark.parametrize("terminal, enabled, kind", [(True, True, "bar"), (False, True, "log"), (True, False, "off"),
                                                     (False, False, "off")])  # fmt: skip
def test_a_terminal_gets_a_bar_a_log_gets_lines_and_quiet_gets_nothing(monkeypatch, terminal, enabled, kind):
    monkeypatch.setattr("sys.stderr", Stream(terminal))
    bar = progress_bar(range(3), desc="x", enabled=enabled)
    if kind == "log":
        assert isinstance(bar, LogProgress)
    else:
        assert isinstance(bar, tqdm) and bar.disable == (kind == "off")
    assert list(bar) == [0, 1, 2]
    bar.close()


@pytest.mark.parametrize("quiet", [False, True], ids=["logged", "quiet"])
def test_compress_into_a_log_reports_training_unless_quiet(tiny_dir, tmp_path, monkeypatch, caplog, capsys, quiet):
    """Through the command line, stderr not a terminal: policy training reports in log lines (every 0 s here)."""
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    caplog.set_level(logging.INFO)
    argv = ["compress", "--model", str(tiny_dir), "--ratio", "0.5", "--method", "prunenet", "--episodes", "3",
            "--out", str(tmp_path / "out")] + (["--quiet"] if quiet else [])  # fmt: skip
    assert main(argv) == 0
    # "policy episodes: 1/3 ep (33%), <rate> ep/s, reward=..., best=...": the count is what is exact
    episodes = [line.split(",")[0] for line in lines(caplog) if line.startswith("policy episodes: ")]
    assert episodes == ([] if quiet else [f"policy episodes: {i}/3 ep ({100 * i / 3:.0f}%)" for i in (1, 2, 3)])
