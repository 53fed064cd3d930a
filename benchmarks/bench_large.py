"""Streaming vs in-memory compression of a large (LLaMA-2-7B-shaped) checkpoint: time per phase, peak memory.

    python benchmarks/bench_large.py                          # 7B fp16, ratio 0.3, 1 episode, CPU
    python benchmarks/bench_large.py --episodes 20 --device cuda
    python benchmarks/bench_large.py --shape tiny --episodes 2 # seconds: a smoke run
    python benchmarks/bench_large.py --method selfcal          # self-calibration, run block by block
    python benchmarks/bench_large.py --method selfcal --layers 4 --calibration words --compensate --skip-in-memory
    python benchmarks/bench_large.py --shape qwen3-30b-a3b --layers 4  # a mixture of experts, 4 real-size blocks

``--compensate`` adds the refit of the kept out-projection columns (``prunenet.compensation``) and
``--calibration`` the user's text (``words``: a text of the checkpoint's own made-up words, written into the work
folder); those rows go to ``large_compensation_<device>.csv``.

``--method selfcal`` runs ``streaming`` (the model offloaded block by block under ``--max-memory``) and
``in-memory`` (where it fits), each with its phases (probe generation, statistics, writing), its forward
plan, and the comparison of the two outputs; results: ``benchmarks/results/large_selfcal_<device>.csv``.

Each run is a fresh child process (``--child``) calling :func:`prunenet.pipeline.compress`; its
peak RSS is the kernel's high-water mark (``VmHWM``), its peak GPU memory
``torch.cuda.max_memory_allocated``. The runs, side by side in one invocation:

* ``streaming``: ``--streaming --max-memory BUDGET``, trains the policy for ``--episodes``;
* ``in-memory``: ``--no-streaming`` (``from_pretrained`` + prune + ``save_pretrained``), reusing the
  streaming run's policy (``--policy``), so it measures loading, selection, slicing and saving; the
  training phase is the same code on the same matrices in both paths (only where they are read from
  differs), and is measured once;
* ``streaming (policy)``: streaming with that policy too, the like-for-like comparison of the rest.

Then both outputs are compared tensor by tensor (they must be identical), and the streaming output
is reloaded with stock ``transformers`` in a child process (FFN width checked). The in-memory child
runs under an address-space limit (``--in-memory-limit``) so that, where the model does not fit, it
fails with an error rather than waking the kernel's OOM killer. The checkpoint is created with
``make_checkpoint.py`` when missing. Results: ``benchmarks/results/large_<device>.csv``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from common import append_csv, device_label, run_tags  # noqa: E402

GIB = 2**30


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> None:
    """One compress run in this process; prints a JSON line with timings and peaks."""
    from prunenet.pipeline import compress

    kwargs = json.loads(args.child)
    start = time.perf_counter()
    result = compress(progress=False, **kwargs)
    row = {
        "wall_s": time.perf_counter() - start,
        **result.timings,
        "streaming": result.streaming,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
    }
    print("RESULT " + json.dumps(row), flush=True)


def run_child(kwargs: dict, limit_bytes: int | None = None) -> dict:
    """Run :func:`child` in a fresh interpreter; returns its result, or ``{"error": ...}``."""

    def limit():
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    cmd = [sys.executable, __file__, "--child", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def reload_check(folder: Path) -> dict:
    """Load ``folder`` with stock transformers in a child process; FFN width and load time."""
    code = (
        "import json,sys,time,torch,transformers;from prunenet.adapters import get_adapter;t=time.perf_counter();"
        "m=transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1],dtype='auto');a=get_adapter(m.config);"
        "last=a.num_layers(m.config)-1;"
        "w={p.shape[s.stored_axis]//s.groups for i in (0,last) for s,p in a.neuron_parameters(m,i)};"
        "print(json.dumps({'config_width':a.ffn_width(m.config),'tensor_widths':sorted(w),"
        "'dtype':str(m.dtype),'load_s':time.perf_counter()-t}))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_tensors(a: Path, b: Path) -> tuple[bool, int]:
    """Whether two checkpoints hold the same tensors (names, dtypes, values); one tensor in memory at a time."""
    from prunenet.safetensors_io import read_tensor
    from prunenet.streaming import CheckpointSource

    sa, sb = CheckpointSource(a), CheckpointSource(b)
    if sa.entries.keys() != sb.entries.keys():
        return False, 0
    for name in sa.entries:
        x, y = read_tensor(sa.entries[name]), read_tensor(sb.entries[name])
        if x.dtype != y.dtype or not torch.equal(x, y):
            return False, len(sa.entries)
    return True, len(sa.entries)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b", help="make_checkpoint.py shape")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--layers", type=int, default=None, help="only the shape's first N blocks (make_checkpoint.py)")
    parser.add_argument("--checkpoint", default=None, help="existing checkpoint (default: WORKDIR/SHAPE-DTYPE)")
    parser.add_argument("--workdir", default="/tmp/prunenet-bench-large", help="checkpoints and outputs go here")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--method", default="prunenet", choices=["prunenet", "selfcal"], help="the selector to time")
    parser.add_argument("--probe-sequences", type=int, default=8, help="--method selfcal: probe sequences")
    parser.add_argument("--probe-length", type=int, default=128, help="--method selfcal: tokens per sequence")
    parser.add_argument("--calibration", default=None, help="--method selfcal: a text file, or 'words' (see above)")
    parser.add_argument("--compensate", action="store_true", help="--method selfcal: refit the kept columns")
    parser.add_argument("--episodes", type=int, default=1, help="policy episodes of the streaming run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-memory", default="3GiB", help="--max-memory of the streaming runs")
    parser.add_argument("--in-memory-limit", default="21GiB", help="address-space limit of the in-memory run")
    parser.add_argument("--skip-in-memory", action="store_true", help="only the streaming runs")
    parser.add_argument("--keep", action="store_true", help="keep the outputs (they are deleted at the end)")
    parser.add_argument("--csv", default=None, help="default: benchmarks/results/large_<cpu|cuda>.csv")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    from make_checkpoint import make_checkpoint

    from prunenet.validate import parse_size

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    layers = f"-{args.layers}layers" if args.layers else ""
    ckpt = Path(args.checkpoint) if args.checkpoint else work / f"{args.shape}{layers}-{args.dtype}"
    if not ckpt.exists():
        start = time.perf_counter()
        make_checkpoint(args.shape, ckpt, args.dtype, layers=args.layers)
        print(f"made {ckpt} in {time.perf_counter() - start:.0f} s", flush=True)
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    if args.method == "selfcal":
        return bench_selfcal(args, ckpt, size)
    common = dict(model=str(ckpt), ratio=args.ratio, device=args.device, seed=0, overwrite=True)
    outs = {name: work / f"out-{name}" for name in ("streaming", "in-memory", "streaming-policy")}
    runs = [
        ("streaming", dict(common, out=str(outs["streaming"]), episodes=args.episodes, streaming=True,
                           max_memory=args.max_memory), None),
        ("in-memory", dict(common, out=str(outs["in-memory"]), policy=str(outs["streaming"]), streaming=False),
         parse_size(args.in_memory_limit)),
        ("streaming (policy)", dict(common, out=str(outs["streaming-policy"]), policy=str(outs["streaming"]),
                                    streaming=True, max_memory=args.max_memory), None),
    ]  # fmt: skip
    if args.skip_in_memory:
        runs = [r for r in runs if r[0] != "in-memory"]
    rows, identical, check = [], "", {}
    for name, kwargs, limit in runs:
        print(f"== {name}", flush=True)
        result = run_child(kwargs, limit)
        print(json.dumps(result), flush=True)
        rows.append((name, kwargs, result))
        out = Path(kwargs["out"])
        if name == "streaming":
            check = reload_check(out)
            print("reload:", json.dumps(check), flush=True)
        elif out.exists() and not args.keep:  # a 7B output is ~11 GB: compare, then free the disk
            if name == "in-memory":
                same, count = same_tensors(outs["streaming"], out)
                identical = f"{same} ({count} tensors)"
                print("streaming and in-memory outputs identical:", identical, flush=True)
            shutil.rmtree(out)

    csv_path = Path(args.csv) if args.csv else HERE / "results" / f"large_{torch.device(args.device).type}.csv"
    csv_rows = []
    for name, kwargs, r in rows:
        csv_rows.append(
            {
                **row_head(args, size),
                "run": name,
                "episodes": kwargs.get("episodes", 0) if "policy" not in kwargs else 0,
                "max_memory": kwargs.get("max_memory", ""),
                "error": r.get("error", ""),
                "wall_s": round(r.get("wall_s", float("nan")), 1),
                "load_s": round(r.get("load_s", float("nan")), 1),
                "train_s": round(r.get("train_s", 0.0), 1),
                "select_slice_s": round(r.get("slice_s", float("nan")), 1),
                "save_s": round(r.get("save_s", float("nan")), 1),
                **row_tail(name, r, check, identical),
            }
        )
    return finish(csv_path, csv_rows, outs, args.keep)


def finish(csv_path: Path, csv_rows: list[dict], outs: dict[str, Path], keep: bool) -> int:
    """Append the rows to the CSV and remove the runs' outputs (unless ``keep``)."""
    append_csv(csv_path, csv_rows)
    print(f"appended {len(csv_rows)} rows to {csv_path}")
    if not keep:
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    return 0


def row_head(args, size: int) -> dict:
    """The CSV columns every run of one invocation shares: provenance, device, checkpoint, ratio."""
    return {
        **run_tags(args.device),
        "device": device_label(args.device),
        "shape": args.shape + (f" ({args.layers} layers)" if args.layers else ""),
        "dtype": args.dtype,
        "checkpoint_gib": round(size / GIB, 2),
        "ratio": args.ratio,
    }


def row_tail(name: str, result: dict, check: dict, identical: str) -> dict:
    """The last CSV columns: peak memory, and for the streaming run the reload check and the comparison."""
    return {
        "peak_rss_gib": round(result.get("peak_rss_bytes", float("nan")) / GIB, 3),
        "peak_gpu_gib": round(result.get("peak_gpu_bytes", float("nan")) / GIB, 3),
        "reload_width": check.get("config_width", check.get("error", "")) if name == "streaming" else "",
        "identical_to_in_memory": identical if name == "streaming" else "",
    }


def calibration_text(spec: str, ckpt: Path, work: Path) -> Path:
    """``spec`` itself, or for ``words`` a file of 200 lines of 64 words drawn (seeded) from the checkpoint's
    tokenizer vocabulary: text its word-level tokenizer reads without unknown words."""
    if spec != "words":
        return Path(spec)
    from transformers import AutoTokenizer

    vocab = sorted(w for w in AutoTokenizer.from_pretrained(ckpt).get_vocab() if w.startswith("w"))
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(len(vocab), (200, 64), generator=generator).tolist()
    path = work / "calibration-words.txt"
    path.write_text("\n".join(" ".join(vocab[i] for i in line) for line in picks) + "\n")
    return path


def bench_selfcal(args, ckpt: Path, size: int) -> int:
    """``--method selfcal``: streaming (block by block) and in-memory, side by side."""
    from prunenet.validate import parse_size

    work = Path(args.workdir)
    common = dict(model=str(ckpt), ratio=args.ratio, device=args.device, seed=0, overwrite=True, method="selfcal",
                  probe_sequences=args.probe_sequences, probe_length=args.probe_length,
                  compensate=args.compensate)  # fmt: skip
    if args.calibration:
        common["calibration"] = [str(calibration_text(args.calibration, ckpt, work))]
    outs = {name: work / f"out-selfcal-{name}" for name in ("streaming", "in-memory")}
    runs = [("streaming", dict(common, out=str(outs["streaming"]), streaming=True, max_memory=args.max_memory), None)]
    if not args.skip_in_memory:
        runs.append(("in-memory", dict(common, out=str(outs["in-memory"]), streaming=False),
                     parse_size(args.in_memory_limit)))  # fmt: skip
    rows, check, identical, kept = [], {}, "", {}
    for name, kwargs, limit in runs:
        print(f"== selfcal {name}", flush=True)
        result = run_child(kwargs, limit)
        print(json.dumps(result), flush=True)
        out = Path(kwargs["out"])
        manifest = json.loads((out / "prunenet.json").read_text()) if (out / "prunenet.json").is_file() else {}
        kept[name] = manifest.get("kept_indices")
        rows.append((name, kwargs, result, manifest.get("memory_plan") or {}))
        if name == "streaming" and out.exists():
            check = reload_check(out)
            print("reload:", json.dumps(check), flush=True)
    if len(runs) == 2 and all(o.exists() for o in outs.values()):
        same, count = same_tensors(outs["streaming"], outs["in-memory"])
        identical = f"{same and kept['streaming'] == kept['in-memory']} ({count} tensors)"
        print("streaming and in-memory outputs identical:", identical, flush=True)
    kind = "compensation" if args.compensate else "selfcal"
    csv_path = Path(args.csv) if args.csv else HERE / "results" / f"large_{kind}_{torch.device(args.device).type}.csv"
    extra = {"calibration": args.calibration or "", "compensate_s": ""} if args.compensate else {}
    csv_rows = [
        {
            **row_head(args, size),
            "probe_tokens": f"{args.probe_sequences}x{args.probe_length}",
            "run": name,
            "max_memory": kwargs.get("max_memory", ""),
            "blocks": plan.get("blocks", ""),
            "plan_estimate_gib": round(plan["estimate"] / GIB, 3) if plan else "",
            "error": r.get("error", ""),
            "wall_s": round(r.get("wall_s", float("nan")), 1),
            "load_s": round(r.get("load_s", float("nan")), 1),
            "probe_s": round(r.get("probe_s", float("nan")), 1),
            "stats_s": round(r.get("stats_s", float("nan")), 1),
            "select_s": round(r.get("select_s", float("nan")), 1),
            "save_s": round(r.get("save_s", float("nan")), 1),
            **{**extra, **({"compensate_s": round(r.get("compensate_s", float("nan")), 1)} if extra else {})},
            **row_tail(name, r, check, identical),
        }
        for name, kwargs, r, plan in rows
    ]
    return finish(csv_path, csv_rows, outs, args.keep)


if __name__ == "__main__":
    raise SystemExit(main())
