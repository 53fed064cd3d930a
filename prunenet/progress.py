"""Progress of long work: a bar for a person at a terminal, a line at least every 30 s into a log.

Every loop that can run for minutes (generation, training, evaluation, writing shards) goes through
:func:`progress_bar`. ``enabled=False`` (``--quiet``, or a rank that does not report) shows nothing. Otherwise
a terminal gets tqdm's bar, and a log file or a pipe gets :class:`LogProgress`: a ``prunenet:`` log line
every :data:`LOG_INTERVAL_S` seconds of the work, so a run in a batch job is never silent for long, and
work shorter than that adds no line at all.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator

from tqdm.auto import tqdm

from .tables import format_bytes

log = logging.getLogger("prunenet")

LOG_INTERVAL_S = 30.0
"""The longest a log goes without a progress line while the work runs."""


class LogProgress:
    """tqdm's interface (iteration, ``update``, ``set_postfix``, ``close``, ``with``) as log lines:
    ``"fine-tuning: 120/190 step (63%), 2.1 step/s, train_loss=3.210"`` at most every ``interval`` seconds
    (default :data:`LOG_INTERVAL_S`).

    ``clock`` is for tests (default :func:`time.monotonic`).
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        desc: str,
        unit: str = "it",
        total: float | None = None,
        interval: float | None = None,
        unit_scale: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.unit, self.total = iterable, desc, unit, total
        self.bytes = unit_scale and unit == "B"  # counts shown as sizes (1.2 GiB), not 1.2e+09 B
        self.interval, self.clock = LOG_INTERVAL_S if interval is None else interval, clock
        self.n = 0
        self.postfix = ""
        self.start = self.last = clock()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        """The progress so far in words."""
        if self.bytes:
            done = format_bytes(int(self.n)) + (f" of {format_bytes(int(self.total))}" if self.total else "")
        else:
            done = f"{self.n:g}" + (f"/{self.total:g}" if self.total else "") + f" {self.unit}"
        if self.total:
            done += f" ({100 * self.n / self.total:.0f}%)"
        elapsed = now - self.start
        if elapsed > 0:
            rate = self.n / elapsed
            done += f", {format_bytes(int(rate))}/s" if self.bytes else f", {rate:.3g} {self.unit}/s"
        return f"{self.desc}: {done}" + (f", {self.postfix}" if self.postfix else "")

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        pass

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shows_bars(enabled: bool = True) -> bool:
    """Whether reported progress is drawn as bars (a terminal, or a notebook's widget) rather than logged: what
    other libraries' own bars (huggingface_hub's downloads, transformers' loading, lm-eval) should follow."""
    # A notebook's stderr is no terminal either, but tqdm.auto draws its widget there.
    return enabled and (sys.stderr.isatty() or "ipykernel" in sys.modules)


def progress_bar(iterable: Iterable | None = None, *, desc: str, unit: str = "it", total: float | None = None,
                 enabled: bool = True, unit_scale: bool = False):  # fmt: skip
    """A progress reporter over ``iterable`` (or, with ``total``, one advanced by ``update``): tqdm's bar when
    ``enabled`` and stderr is a terminal, :class:`LogProgress` when ``enabled`` and it is not, a silent bar
    otherwise."""
    if enabled and not shows_bars():
        return LogProgress(iterable, desc=desc, unit=unit, total=total, unit_scale=unit_scale)
    return tqdm(iterable, desc=desc, unit=unit, total=total, unit_scale=unit_scale, disable=not enabled)
