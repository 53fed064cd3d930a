"""The deliberate slow-down that demonstrates `make bench-micro-compare` failing (it lives here, never in the
package), and a smaller JSON.

``PRUNENET_MICRO_SLOWDOWN=<benchmark name>`` (the name pytest-benchmark prints, e.g.
``'test_slice_ffn[fp32-native]'``) makes that benchmark's timed function sleep, after its op, for as long
as the op took: its time roughly doubles (+100%), the others are unchanged. A name that matches no
benchmark stops the run, so a typo cannot pass for "no regression".

The JSON written by ``--benchmark-json`` (the committed baseline) keeps each benchmark's statistics, not the time of
every round: the compare reads only the statistics. A failed compare ends with pytest-benchmark's lines naming the
slower benchmarks and exit status 1, without the traceback of its exception.
"""

from __future__ import annotations

import functools
import os
import time

import pytest
from pytest_benchmark.session import PerformanceRegression

SLOWDOWN = os.environ.get("PRUNENET_MICRO_SLOWDOWN", "")


def pytest_collection_modifyitems(config, items):
    names = [item.name for item in items]
    if SLOWDOWN and SLOWDOWN not in names:
        raise pytest.UsageError(f"PRUNENET_MICRO_SLOWDOWN={SLOWDOWN!r} names no benchmark; one of: {', '.join(names)}")


@pytest.fixture
def slowed(request):
    """``slowed(op)``: ``op`` itself, or for the benchmark named in ``PRUNENET_MICRO_SLOWDOWN``, ``op`` then a sleep
    as long as it took."""

    def wrap(op):
        if request.node.name != SLOWDOWN:
            return op

        @functools.wraps(op)
        def twice_as_slow(*args, **kwargs):
            tick = time.perf_counter()
            result = op(*args, **kwargs)
            time.sleep(time.perf_counter() - tick)
            return result

        return twice_as_slow

    return wrap


def pytest_benchmark_update_json(config, benchmarks, output_json):
    for bench in output_json["benchmarks"]:
        bench["stats"].pop("data", None)


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outside the terminal summary, where the error is raised
def pytest_sessionfinish(session):
    try:
        return (yield)
    except PerformanceRegression:  # raised after printing "Performance has regressed:" and the benchmarks
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
