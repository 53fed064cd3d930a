"""One training episode's spectral reward, three ways side by side in one run.

    python benchmarks/bench_reward.py [--quick] [--shapes NAME ...] [--repeats 3] [--device cpu|cuda]
    python benchmarks/bench_reward.py --shapes llama-2-7b --layers 8 --csv out.csv --md out.md

* ``original``: the reference implementation's method, one layer at a time: ``torch.linalg.svdvals``
  of ``W[keep]`` on the device, then ``scipy.stats.ks_2samp`` on the CPU.
* ``torch``: :func:`prunenet.reward.episode_rewards` with the pure-PyTorch backend (Gram matrices,
  ``W^T W - W[drop]^T W[drop]`` at this ratio, batched eigen-solve, ``searchsorted`` KS).
* ``torch-dxd`` (only for states with ``n <= d``, e.g. ``qwen3-30b-a3b-experts``): the torch backend
  forced onto the ``d x d`` Gram route it takes for ``n > d``, beside its ``n x n`` row-Gram route.
* ``triton``: the same with the Triton kernels (CUDA; on CPU only in Triton's interpreter, when
  ``TRITON_INTERPRET=1`` is set: slow, for rehearsals; "n/a" elsewhere).

Shapes are the FFN state matrices (layers x n x d) of OPT-125m, SmolLM2-135M, LLaMA-2-7B and
LLaMA-2-13B with random weights, keeping k = floor(0.7 n) random rows per layer (ratio 0.3). The
per-run set-up (reference spectra; for the batched paths also the full Gram matrices) is excluded
from the episode time and reported separately: its time and peak memory, which includes what it
keeps for the run. Time: median of ``--repeats`` rounds after a warm-up, the methods interleaved
within each round so that load from other jobs on a shared machine hits them alike (a method
slower than 10 s: its warm-up run only). Peak memory: the most memory held above what was held
before the call (CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS, reset through
``/proc/self/clear_refs``). ``max_rel_diff`` compares each method's rewards with the original's.
``loadavg_1m`` (CPU) is the machine's load average after the shape's runs: on a shared machine,
timings are comparable only within one run.

Default shapes: all four on CUDA; on CPU only OPT-125m and SmolLM2-135M (``--quick``), since the
per-layer SVDs of the 7B/13B shapes take many minutes on a few cores (name them with ``--shapes``).
``--layers N`` takes only N layers of each shape (the episode time scales with the layer count).
``--shapes tiny`` (2 x 172 x 64, never a default) takes seconds even in Triton's interpreter.
Rows are appended to ``results/reward.csv`` (``--csv``); the run's table goes to
``results/reward_<device>.md`` (``--md``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import scipy.stats
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
from common import append_csv, git_revision  # noqa: E402

from prunenet import ops, reward
from prunenet.tables import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # layers, n (FFN width), d (hidden size)
    "opt-125m": (12, 3072, 768),
    "smollm2-135m": (30, 1536, 576),
    "llama-2-7b": (32, 11008, 4096),
    "llama-2-13b": (40, 13824, 5120),
    "qwen3-30b-a3b-experts": (128, 768, 2048),  # one block's 128 experts: fewer rows than columns
    "tiny": (2, 172, 64),  # seconds even in Triton's interpreter: for rehearsals (tools/gpu-check --dry-run)
}
QUICK = ["opt-125m", "smollm2-135m"]
FULL = ["opt-125m", "smollm2-135m", "llama-2-7b", "llama-2-13b"]  # the default on CUDA
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RATIO = 0.3


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


class PeakMemory:
    """Peak memory (MB) held above the level at entry: CUDA allocator, or the process RSS on CPU."""

    def __init__(self, device: str):
        self.device = device
        self.mb = float("nan")

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:  # "5" resets the peak RSS (VmHWM) to the current RSS
                Path("/proc/self/clear_refs").write_text("5")
                self.base = self._status("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.base is not None:
            self.mb = (self._status("VmHWM") - self.base) / 2**20


def timed_once(fn, device: str) -> tuple[float, object]:
    """Wall-clock ms of one ``fn()`` call (synchronised on CUDA), and its result."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, out


def original_rewards(states, keeps, ref_spectra_np) -> torch.Tensor:
    """The reference implementation's method: per layer, ``svdvals`` of the sliced matrix, then scipy's KS."""
    out = []
    for w, keep, ref in zip(states, keeps, ref_spectra_np, strict=True):
        spectrum = torch.linalg.svdvals(w.index_select(0, keep).float()).cpu().numpy()
        d = scipy.stats.ks_2samp(ref, spectrum).statistic
        out.append(1.0 / d if d > 0 else reward.REWARD_AT_ZERO)
    return torch.tensor(out, dtype=torch.float64)


def triton_runs_on(device: str) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA, or CPU inside Triton's interpreter."""
    return ops.triton_available() and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def with_column_grams(fn, *args):
    """``fn(*args)`` with the reward forced onto the ``d x d`` Gram route (``W^T W``)."""
    saved = reward.gram_side, reward.keeps_full_grams
    reward.gram_side = lambda n, d: "cols"
    reward.keeps_full_grams = lambda n, d, k, backend="torch": k is not None and ops.use_complement(n, k, backend)
    try:
        return fn(*args)
    finally:
        reward.gram_side, reward.keeps_full_grams = saved


def measure(name: str, device: str, dtype: torch.dtype, repeats: int, layers: int | None = None) -> list[dict]:
    shape_layers, n, d = SHAPES[name]
    layers = min(layers or shape_layers, shape_layers)
    k = math.floor((1 - RATIO) * n)
    g = torch.Generator().manual_seed(0)
    states = [(torch.randn(n, d, generator=g) * 0.02).to(dtype).to(device) for _ in range(layers)]
    keeps = [torch.randperm(n, generator=g)[:k].sort().values.to(device) for _ in range(layers)]

    methods = ["original", "torch"] + (["torch-dxd"] if ops.gram_side(n, d) == "rows" else [])
    methods += ["triton"] if triton_runs_on(device) else []
    runs, results = {}, {}
    for method in methods:
        tick = time.perf_counter()
        with PeakMemory(device) as setup_peak:  # reference spectra (+ W^T W), held for the whole run
            if method == "original":
                references = [torch.linalg.svdvals(w.float()).cpu().numpy() for w in states]
                runs[method] = functools.partial(original_rewards, states, keeps, references)
            elif method == "torch-dxd":
                prepared = with_column_grams(reward.prepare_reward, states, k, "torch")
                runs[method] = functools.partial(with_column_grams, reward.episode_rewards, states, keeps, prepared)
            else:
                prepared = reward.prepare_reward(states, k, method)
                runs[method] = functools.partial(reward.episode_rewards, states, keeps, prepared)
        setup_ms = (time.perf_counter() - tick) * 1e3
        with PeakMemory(device) as peak:  # the warm-up run
            first_ms, rewards = timed_once(runs[method], device)
        results[method] = dict(
            times=[first_ms], setup_ms=setup_ms, setup_mb=setup_peak.mb, peak_mb=peak.mb, rewards=rewards
        )
    # Timed rounds, the methods interleaved within each round, so that a change in the machine's load
    # (it is shared) hits all of them alike; a method slower than 10 s keeps its warm-up time only.
    timed_methods = [m for m in methods if results[m]["times"][0] <= 10_000]
    for _ in range(repeats):
        for method in timed_methods:
            results[method]["times"].append(timed_once(runs[method], device)[0])
    for method in methods:
        r = results[method]
        r["ms"] = statistics.median(r["times"][1:] or r["times"])
        print(f"  {name} {method}: {r['ms']:.1f} ms (set-up {r['setup_ms']:.0f} ms, peak +{r['peak_mb']:.0f} MB)")
    del runs

    if device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"
    base = results["original"]
    load = f"{os.getloadavg()[0]:.2f}" if device == "cpu" else "n/a"  # other jobs on a shared CPU skew timings
    rows = []
    for method in ["original", "torch", "torch-dxd", "triton"]:
        if method == "torch-dxd" and method not in results:
            continue
        r = results.get(method)
        rows.append(
            {
                "date": datetime.date.today().isoformat(),
                "git": git_revision(),
                "torch": torch.__version__,
                "triton": triton_version(),
                "device": device_name,
                "loadavg_1m": load,
                "shape": f"{name} {layers}x{n}x{d} k={k}",
                "dtype": str(dtype).removeprefix("torch."),
                "method": method,
                "episode_ms": round(r["ms"], 2) if r else "n/a",
                "speedup_vs_original": round(base["ms"] / r["ms"], 2) if r else "n/a",
                "peak_mb": round(r["peak_mb"], 1) if r else "n/a",
                "setup_ms": round(r["setup_ms"], 1) if r else "n/a",
                "setup_peak_mb": round(r["setup_mb"], 1) if r else "n/a",
                "max_rel_diff": (
                    f"{((r['rewards'] - base['rewards']).abs() / base['rewards']).max().item():.2e}" if r else "n/a"
                ),
            }
        )
    return rows


def markdown(rows: list[dict], command: str) -> str:
    cols = ["shape", "dtype", "method", "episode_ms", "speedup_vs_original", "peak_mb", "setup_ms", "setup_peak_mb"]
    cols += ["max_rel_diff", "loadavg_1m"]
    head = f"Spectral reward, one episode (ratio {RATIO}); device {rows[0]['device']}, torch {rows[0]['torch']}, "
    head += f"triton {rows[0]['triton']}, git {rows[0]['git']}, {rows[0]['date']}.\n\n`{command}`\n\n"
    return head + markdown_table(cols, [[row[c] for c in cols] for row in rows]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help=f"only {' and '.join(QUICK)}")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="shapes to run (default: see above)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="weight dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (median)")
    parser.add_argument("--layers", type=int, help="only this many layers of each shape (default: all)")
    parser.add_argument("--csv", type=Path, help="CSV to append the rows to (default: results/reward.csv)")
    parser.add_argument("--md", type=Path, help="Markdown table of the run (default: results/reward_<device>.md)")
    args = parser.parse_args()
    device = torch.device(args.device).type
    shapes = args.shapes or (QUICK if args.quick or device == "cpu" else FULL)
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")

    rows = []
    for name in shapes:
        rows += measure(name, device, dtype, args.repeats, args.layers)
    table = markdown(rows, "python " + " ".join(sys.argv))
    print("\n" + table)
    append_csv(args.csv or RESULTS / "reward.csv", rows)
    md = args.md or RESULTS / f"reward_{device}.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(table)


if __name__ == "__main__":
    main()
