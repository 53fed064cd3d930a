"""In-place FFN slicing: the native fused op vs the pure-PyTorch path, time and peak extra memory side by side.

    python benchmarks/bench_slicing.py --quick                  # SmolLM2-135M + LLaMA-2-7B, fp16, ratio 0.3
    python benchmarks/bench_slicing.py                          # every shape x fp16/bf16/fp32 x ratio 0.2/0.3/0.5
    python benchmarks/bench_slicing.py --shapes opt-125m smollm2-135m --dtypes fp32 --ratios 0.3 --repeats 5
    python benchmarks/bench_slicing.py --device cuda            # on a GPU (needs the CUDA build of prunenet._C)

Each case (shape, dtype, ratio, backend) slices one FFN with :func:`prunenet.slicing.slice_ffn_`:

* ``native``: the fused in-place op ``torch.ops.prunenet.slice_ffn_`` (a few MiB of scratch);
* ``torch``: each tensor replaced in turn by its ``index_select`` copy.

Shapes (random weights; ``k = kept_width(ratio, n)`` kept neurons, a sorted random subset with a fixed
seed, the same for both backends):

* ``opt-125m``: n=3072, d=768; rows: fc1.weight (n, d), fc1.bias (n,); cols: fc2.weight (d, n)
* ``smollm2-135m``: n=1536, d=576; rows: gate_proj, up_proj (n, d); cols: down_proj (d, n)
* ``llama-2-7b``: n=11008, d=4096, gated as SmolLM2
* ``llama-2-70b``: n=28672, d=8192, gated as SmolLM2 (fp32: 2.8 GB per FFN)

Every case runs in its own subprocess (this script with ``--worker``, which prints one JSON line), so
that its peak memory is not polluted by an earlier case. In the worker:

* Peak extra memory. The tensors are allocated and filled in place (``torch.empty(...).normal_()``: no
  temporaries), the op is run once on a tiny FFN (spawns the OpenMP threads, loads kernels), then
  CPU: the baseline is VmRSS, the peak resident size VmHWM is reset by writing ``5`` to
  ``/proc/self/clear_refs``, the op runs once, and ``peak_extra = VmHWM - baseline``. If the kernel
  refuses that write, the lifetime peak ``ru_maxrss`` is used instead (said in the output; it can
  only under-estimate). CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()``
  after ``reset_peak_memory_stats``. Reported in bytes and in % of the FFN's bytes (all its
  neuron-indexed tensors before slicing).
* Time: fresh tensors are filled for each of ``--repeats`` runs (the op is in place; refilling is not
  timed) and the median is reported. CPU: ``time.perf_counter``; CUDA: ``torch.cuda.Event`` around the
  op after flushing the L2 cache (``triton.testing.do_bench`` cannot be used: it re-runs the op on the
  same, already sliced, tensors).
* Correctness (``ok``), on the first timed run: shapes up to OPT-125m/SmolLM2 size are compared in full
  with ``index_select`` of a saved copy; larger ones (no room for a second copy) compare a few kept
  rows/columns (first, last and random ones) with saved copies of just those.

At most one FFN plus one sliced tensor (the torch path's copy) is held at a time, and no copies of
large FFNs: LLaMA-2-70B in fp32 peaks at about 3.5 GB.

The table (per shape, dtype, ratio: both backends' median time and peak extra %, and the time ratio
torch/native) is printed at the end; one CSV row per case is appended to
``benchmarks/results/slicing_<device>.csv`` (or ``--out``), with the command line that produced it,
how peak memory was measured (``peak_method``) and ``other_cpu_load``: how many CPUs other processes
kept busy during the case (from ``/proc/stat``). Above 0.25 a warning is printed: on a shared machine
the CPU times, the native op's parallel regions most of all, are then unreliable.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import json
import math
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
from common import OtherLoad, git_revision  # noqa: E402
from provenance import cpu_model_name  # noqa: E402

from prunenet import ops, slicing
from prunenet.config import kept_width

RESULTS = Path(__file__).resolve().parent / "results"
# name: (n, d, gated). Gated: rows gate_proj, up_proj (n, d); cols down_proj (d, n).
# Not gated (OPT): rows fc1.weight (n, d), fc1.bias (n,); cols fc2.weight (d, n).
SHAPES = {
    "opt-125m": (3072, 768, False),
    "smollm2-135m": (1536, 576, True),
    "llama-2-7b": (11008, 4096, True),
    "llama-2-70b": (28672, 8192, True),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RATIOS = (0.2, 0.3, 0.5)
BACKENDS = ("native", "torch")
QUICK = {"shapes": ["smollm2-135m", "llama-2-7b"], "dtypes": ["fp16"], "ratios": [0.3]}
SEED = 0
# FFNs up to this many elements (OPT-125m: 4.7 M) are checked in full against a saved copy.
FULL_CHECK_MAX_ELEMENTS = 8 << 20
# Other processes using more CPUs than this during a case make its timing suspect (a warning is printed).
BUSY = 0.25
SPOT_CHECKS = 8  # kept neurons compared on larger FFNs (first, last and random ones)
CSV_COLUMNS = [
    "timestamp",
    "git_revision",
    "device_name",
    "threads",
    "torch_version",
    "model",
    "n",
    "d",
    "dtype",
    "ratio",
    "k",
    "backend",
    "time_ms",
    "peak_extra_bytes",
    "ffn_bytes",
    "peak_extra_pct",
    "ok",
    "peak_method",
    "other_cpu_load",
    "command",
]


# ----------------------------------------------------------------------------------------------- worker


def ffn_shapes(model: str) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Shapes of the FFN's tensors with neurons on dim 0 (``rows``) and on dim 1 (``cols``)."""
    n, d, gated = SHAPES[model]
    return ([(n, d), (n, d)] if gated else [(n, d), (n,)]), [(d, n)]


def make_ffn(
    row_shapes: list[tuple[int, ...]], col_shapes: list[tuple[int, ...]], dtype: torch.dtype, device: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Fresh random tensors, filled in place (no temporary the size of a tensor)."""
    fill = lambda shape: torch.empty(shape, dtype=dtype, device=device).normal_()  # noqa: E731
    return [fill(s) for s in row_shapes], [fill(s) for s in col_shapes]


def random_keep(n: int, k: int, device: str) -> torch.Tensor:
    """``k`` of ``n`` neurons: a sorted random subset, the same for every backend (fixed seed)."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randperm(n, generator=generator)[:k].sort().values.to(device)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def proc_status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False if the kernel refuses (or ignores) it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    # The reset sets VmHWM to the current RSS; allow some slack for pages touched since.
    return proc_status_bytes("VmHWM") - proc_status_bytes("VmRSS") < (4 << 20)


def peak_extra_bytes(run, device: str) -> tuple[int, str]:
    """Run ``run()`` once; return the most memory held above the level before it, and how that was measured."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated"
    base = proc_status_bytes("VmRSS")
    if reset_peak_rss():
        run()
        return proc_status_bytes("VmHWM") - base, "VmHWM reset by clear_refs"
    run()  # fallback: the lifetime peak; ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, "ru_maxrss (clear_refs refused)"


def save_reference(rows: list[torch.Tensor], cols: list[torch.Tensor], keep: torch.Tensor, full: bool):
    """What the sliced tensors must hold: full ``index_select`` results (small FFNs) or a few kept neurons."""
    if full:
        return "full", [t.index_select(0, keep) for t in rows] + [t.index_select(1, keep) for t in cols]
    k = keep.numel()
    generator = torch.Generator().manual_seed(SEED + 1)
    picks = sorted({0, k - 1, *torch.randint(k, (SPOT_CHECKS - 2,), generator=generator).tolist()})
    neurons = keep[picks].tolist()
    saved = [t[neurons].clone() for t in rows] + [t[:, neurons].clone() for t in cols]
    return picks, saved


def check_result(rows: list[torch.Tensor], cols: list[torch.Tensor], keep: torch.Tensor, reference) -> bool:
    """Shapes are the sliced ones and the values match ``reference`` (from :func:`save_reference`) exactly."""
    picks, saved = reference
    k = keep.numel()
    shapes_ok = all(t.shape[0] == k for t in rows) and all(t.shape[1] == k for t in cols)
    if not shapes_ok:
        return False
    if picks == "full":
        got = list(rows) + list(cols)
    else:
        got = [t[picks] for t in rows] + [t[:, picks] for t in cols]
    return all(torch.equal(a, b) for a, b in zip(got, saved, strict=True))


def l2_flush_buffer(device: str) -> torch.Tensor | None:
    """A buffer larger than any GPU's L2 cache, zeroed before each timed CUDA run (as ``do_bench`` does)."""
    return torch.empty(256 << 20, dtype=torch.int8, device=device) if device == "cuda" else None


def run_worker(model: str, dtype_name: str, ratio: float, backend: str, device: str, repeats: int) -> dict:
    """Measure one case in this (fresh) process; returns the measurement as a dict."""
    torch.manual_seed(SEED)
    n, d, _ = SHAPES[model]
    dtype = DTYPES[dtype_name]
    k = kept_width(ratio, n)
    keep = random_keep(n, k, device)
    row_shapes, col_shapes = ffn_shapes(model)

    def op(rows: list[torch.Tensor], cols: list[torch.Tensor], keep: torch.Tensor, width: int) -> None:
        slicing.slice_ffn_(rows, cols, keep, width, backend=backend)

    # Warm-up on a tiny FFN of the same structure (starts the OpenMP pool, loads CUDA kernels).
    tiny_rows, tiny_cols = make_ffn([(512, 128)] * len(row_shapes), [(128, 512)], dtype, device)
    op(tiny_rows, tiny_cols, random_keep(512, 300, device), 512)
    del tiny_rows, tiny_cols

    # Peak extra memory of one call.
    rows, cols = make_ffn(row_shapes, col_shapes, dtype, device)
    ffn_bytes = sum(t.numel() * t.element_size() for t in rows + cols)
    ffn_elements = sum(t.numel() for t in rows + cols)
    synchronize(device)
    peak, peak_method = peak_extra_bytes(functools.partial(op, rows, cols, keep, n), device)
    ok = all(t.shape[0] == k for t in rows) and all(t.shape[1] == k for t in cols)
    del rows, cols

    # Time, on fresh tensors each run; correctness on the first.
    flush = l2_flush_buffer(device)
    times = []
    for i in range(repeats):
        rows, cols = make_ffn(row_shapes, col_shapes, dtype, device)
        reference = save_reference(rows, cols, keep, ffn_elements <= FULL_CHECK_MAX_ELEMENTS) if i == 0 else None
        if device == "cuda":
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            op(rows, cols, keep, n)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tick = time.perf_counter()
            op(rows, cols, keep, n)
            times.append((time.perf_counter() - tick) * 1e3)
        if reference is not None:
            ok = ok and check_result(rows, cols, keep, reference)
        del rows, cols, reference  # before the next fill: never two FFNs at once

    return {
        "model": model,
        "n": n,
        "d": d,
        "dtype": dtype_name,
        "ratio": ratio,
        "k": k,
        "backend": backend,
        "time_ms": round(statistics.median(times), 4),
        "times_ms": [round(t, 4) for t in times],
        "peak_extra_bytes": peak,
        "ffn_bytes": ffn_bytes,
        "peak_extra_pct": round(100.0 * peak / ffn_bytes, 3),
        "ok": bool(ok),
        "peak_method": peak_method,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------- driver


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name from ``/proc/cpuinfo``."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return cpu_model_name() or "cpu"


def native_unavailable_reason(device: str) -> str | None:
    """Why the native backend cannot run here, or None if it can."""
    if not ops.available():
        return f"prunenet._C is not available ({ops.import_error()})"
    if not hasattr(torch.ops.prunenet, "slice_ffn_"):
        return "prunenet._C has no slice_ffn_ op yet (rebuild the extension: pip install --no-build-isolation -e .)"
    if device == "cuda" and not ops.cuda_available():
        return "prunenet._C was built without CUDA kernels"
    return None


def run_case(model: str, dtype: str, ratio: float, backend: str, device: str, repeats: int) -> dict:
    """Run one case in a fresh subprocess; a crashed worker gives a row with ``ok`` saying so.

    Also measures ``other_cpu_load``: the CPUs other processes kept busy meanwhile (their load makes
    CPU timings unreliable, the parallel regions of the native op most of all).
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--shapes", model, "--dtypes", dtype]
    cmd += ["--ratios", str(ratio), "--backends", backend, "--device", device, "--repeats", str(repeats)]
    with OtherLoad() as load:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    other_load = load.value
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "other_cpu_load": other_load}
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    print(f"  worker failed (exit code {proc.returncode}): {tail}", file=sys.stderr)
    n, d, _ = SHAPES[model]
    return {"model": model, "n": n, "d": d, "dtype": dtype, "ratio": ratio, "k": kept_width(ratio, n),
            "backend": backend, "time_ms": math.nan, "peak_extra_bytes": "", "ffn_bytes": "",
            "peak_extra_pct": math.nan, "ok": f"worker failed (exit code {proc.returncode})", "peak_method": "",
            "threads": torch.get_num_threads(), "other_cpu_load": other_load}  # fmt: skip


def mib(nbytes) -> str:
    return f"{nbytes / 2**20:.1f}" if isinstance(nbytes, int) else "-"


def table(results: list[dict], backends: list[str]) -> str:
    """Aligned text table: one line per (shape, dtype, ratio), the backends side by side."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in results:
        cases.setdefault((r["model"], r["dtype"], r["ratio"]), {})[r["backend"]] = r
    head = ["model", "n", "d", "dtype", "ratio", "k", "FFN MiB"]
    for b in backends:
        head += [f"{b} ms", f"{b} peak MiB", f"{b} peak %", f"{b} ok"]
    if set(BACKENDS) <= set(backends):
        head.append("torch/native")
    lines = [head]
    for (model, dtype, ratio), by_backend in cases.items():
        first = next(iter(by_backend.values()))
        line = [model, str(first["n"]), str(first["d"]), dtype, str(ratio), str(first["k"])]
        line.append(mib(next((r["ffn_bytes"] for r in by_backend.values() if r["ffn_bytes"] != ""), "")))
        for b in backends:
            r = by_backend.get(b)
            if r is None:
                line += ["skipped", "-", "-", "-"]
            else:
                line += [f"{r['time_ms']:.3f}", mib(r["peak_extra_bytes"]), f"{r['peak_extra_pct']:.2f}", str(r["ok"])]
        if set(BACKENDS) <= set(backends):
            native, ref = by_backend.get("native"), by_backend.get("torch")
            line.append(f"{ref['time_ms'] / native['time_ms']:.2f}x" if native and ref else "-")
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]

    def fmt(row: list[str]) -> str:  # text columns (model .. ratio) left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    return "\n".join([fmt(lines[0]), fmt(["-" * w for w in widths]), *map(fmt, lines[1:])])


def check_csv_header(path: Path) -> None:
    """Refuse to append to a CSV written with other columns (before spending minutes on the run)."""
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != CSV_COLUMNS:
            sys.exit(f"{path} has other columns than this script writes; move it away or pass --out")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"only {' and '.join(QUICK['shapes'])}, fp16, ratio 0.3 (--shapes/--dtypes/--ratios override it)",
    )
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="FFN shapes to run (default: all)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="weight dtypes (default: all)")
    parser.add_argument(
        "--ratios", nargs="+", type=float, help=f"pruning ratios; k = floor((1 - ratio) n) (default: {RATIOS})"
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=list(BACKENDS),
        default=list(BACKENDS),
        help="slice_ffn_ backends to compare (default: both; native is skipped, with a message, if unavailable)",
    )
    parser.add_argument(
        "--repeats", type=int, help="timed runs per case, each on freshly filled tensors; the median is reported "
        "(default: 3 on CPU, 10 on CUDA)",
    )  # fmt: skip
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the tensors live (default: cuda if available, else cpu)",
    )
    parser.add_argument("--json", action="store_true", help="print the result rows as JSON lines instead of the table")
    parser.add_argument(
        "--out", type=Path, help="CSV file to append the rows to (default: benchmarks/results/slicing_<device>.csv)"
    )
    parser.add_argument(
        "--worker",
        action="store_true",
        help="internal: measure the single case given by --shapes/--dtypes/--ratios/--backends in this process "
        "and print it as one JSON line",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes = args.shapes or QUICK["shapes"]
        args.dtypes = args.dtypes or QUICK["dtypes"]
        args.ratios = args.ratios or QUICK["ratios"]
    args.shapes = args.shapes or list(SHAPES)
    args.dtypes = args.dtypes or list(DTYPES)
    args.ratios = args.ratios or list(RATIOS)
    args.repeats = args.repeats or (10 if args.device == "cuda" else 3)
    for ratio in args.ratios:
        if not 0 <= ratio < 1 or min(kept_width(ratio, SHAPES[s][0]) for s in args.shapes) < 1:
            parser.error(f"--ratios: {ratio} must be in [0, 1) and keep at least one neuron")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        if len(args.shapes) * len(args.dtypes) * len(args.ratios) * len(args.backends) != 1:
            sys.exit("--worker takes exactly one shape, dtype, ratio and backend")
        row = run_worker(args.shapes[0], args.dtypes[0], args.ratios[0], args.backends[0], args.device, args.repeats)
        print(json.dumps(row), flush=True)
        return

    command = shlex.join(["python", *sys.argv])
    out = args.out or RESULTS / f"slicing_{args.device}.csv"
    check_csv_header(out)
    backends = list(args.backends)
    if "native" in backends and (reason := native_unavailable_reason(args.device)):
        print(f"skipping the native backend: {reason}", file=sys.stderr)
        backends.remove("native")
    if not backends:
        sys.exit("no backend left to run")
    threads = torch.get_num_threads()
    print(f"{device_name(args.device)}, {threads} threads, torch {torch.__version__}: {command}", file=sys.stderr)

    results = []
    tick = time.perf_counter()
    for model in args.shapes:
        for dtype in args.dtypes:
            for ratio in args.ratios:
                for backend in backends:
                    r = run_case(model, dtype, ratio, backend, args.device, args.repeats)
                    results.append(r)
                    print(
                        f"  {model} {dtype} ratio {ratio} {backend}: {r['time_ms']:.3f} ms, peak +"
                        f"{mib(r['peak_extra_bytes'])} MiB ({r['peak_extra_pct']:.2f}% of the FFN), ok={r['ok']}"
                        + (f"; other processes used {load:.2f} CPUs" if (load := r["other_cpu_load"]) > BUSY else ""),
                        file=sys.stderr,
                        flush=True,
                    )
    elapsed = time.perf_counter() - tick
    methods = {r["peak_method"] for r in results if r["peak_method"]}
    if any(m.startswith("ru_maxrss") for m in methods):
        print("warning: /proc/self/clear_refs was refused; peak memory is the lifetime ru_maxrss", file=sys.stderr)

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    common = {
        "timestamp": stamp,
        "git_revision": git_revision(),
        "device_name": device_name(args.device),
        "torch_version": torch.__version__,
        "command": command,
    }
    rows = [{c: {**common, **r}[c] for c in CSV_COLUMNS} for r in results]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"\n{common['device_name']}, {threads} threads, torch {torch.__version__}, git {common['git_revision']}")
        print(f"peak memory: {', '.join(sorted(methods))}; {len(results)} cases in {elapsed:.0f} s")
        print(f"{command}\n")
        print(table(results, backends))
    busy = [r for r in results if r["other_cpu_load"] > BUSY]
    if busy:
        worst = max(r["other_cpu_load"] for r in busy)
        print(
            f"\nwarning: other processes kept up to {worst:.2f} CPUs busy during {len(busy)} of {len(results)} cases "
            "(column other_cpu_load of the CSV); their times are unreliable: re-run on an idle machine",
            file=sys.stderr,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists() or out.stat().st_size == 0
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"\nappended {len(rows)} rows to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
