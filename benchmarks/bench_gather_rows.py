"""Native `prunenet.gather_rows` vs the pure-PyTorch `index_select`, side by side in one run.

    python benchmarks/bench_gather_rows.py [--repeats 20] [--device cpu|cuda]

Shapes are the FFN in-projections of the embedded model (1536 x 576) and of LLaMA-2-7B
(11008 x 4096), keeping 70% of the rows. CPU: median of `--repeats` wall-clock runs; CUDA:
`triton.testing.do_bench` when available. Rows are appended to `results/gather_rows.csv`.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
from common import append_csv  # noqa: E402

from prunenet import _ext

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [("smollm2-135m gate_proj", 1536, 576), ("llama-2-7b gate_proj", 11008, 4096)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def median_ms(fn, repeats: int, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    _ext.require()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    device_name = f"{device_name} ({torch.get_num_threads()} threads)" if args.device == "cpu" else device_name
    rows = []
    for label, n, d in SHAPES:
        for dtype_name, dtype in DTYPES.items():
            src = torch.randn(n, d, device=args.device).to(dtype)
            keep = torch.randperm(n, device=args.device)[: int(0.7 * n)].sort().values
            native = median_ms(lambda s=src, k=keep: torch.ops.prunenet.gather_rows(s, k), args.repeats, args.device)
            ref = median_ms(lambda s=src, k=keep: _ext.gather_rows_ref(s, k), args.repeats, args.device)
            rows.append(
                {
                    "date": datetime.date.today().isoformat(),
                    "git": git_revision(),
                    "torch": torch.__version__,
                    "device": device_name,
                    "shape": f"{label} {n}x{d} keep {keep.numel()}",
                    "dtype": dtype_name,
                    "native_ms": round(native, 4),
                    "torch_ms": round(ref, 4),
                    "speedup": round(ref / native, 3),
                }
            )
            print(" | ".join(str(v) for v in rows[-1].values()), flush=True)
    append_csv(RESULTS / "gather_rows.csv", rows)


if __name__ == "__main__":
    main()
