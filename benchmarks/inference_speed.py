"""What pruning buys at inference: dense vs pruned models side by side, in ``transformers`` and in llama.cpp.

    python benchmarks/inference_speed.py              # embedded SmolLM2-135M + LLaMA-2-7B-shaped blocks, fp32 and
                                                      # bf16, ratios 0.1/0.2/0.3 x width multiples 1/64/128/256
    python benchmarks/inference_speed.py --quick      # the embedded model only, fp32, ratio 0.3, 2 repeats
    python benchmarks/inference_speed.py --device cuda # on a GPU (tools/gpu-check runs this)
    python benchmarks/inference_speed.py --report     # only the docs table and the plot, from the CSV

Models (``--shapes``):

* ``smollm2-135m``: the embedded model (30 blocks, FFN width 1536, tied head).
* ``llama2-7b``: ``--blocks`` (default 2) LLaMA-2-7B blocks (hidden 4096, FFN width 11008) with its 32000-token
  head, random weights from ``benchmarks/make_checkpoint.py``. A block's cost is what scales with depth; the
  head is kept so the decode step reads what a real model's does beside its blocks.

Each pruned variant is ``prunenet compress --method magnitude --ratio R --width-multiple M`` of the dense model
(which neurons are kept does not change the speed; only the width does); variants that reach the same width
are measured once. Every measurement runs in a fresh process (this script with ``--worker``) so that its peak
resident memory (``VmHWM``) holds only that model; the repeats are interleaved (repeat 1 of every variant, then
repeat 2, ...) so that load from other jobs hits them alike, and medians are reported. In a worker, after a short
untimed warm-up:

* prefill: a 512-token prompt (batch 1), logits of the last position only (as ``generate`` does); the median
  of 3;
* decode, batch 1: ``--new-tokens`` greedy steps with the KV cache after that prompt;
* decode, batch 8: the same after a 64-token prompt per sequence.

In llama.cpp (``--runtimes llama.cpp``; needs the ``[gguf]`` extra) every variant is exported with ``prunenet
export`` as ``--quants`` (F16 and Q4_K_M) at the ``--gguf-multiples`` (1, 32, 256: 32-value blocks are what
llama.cpp's Q8_0/Q5_0 need along a row, 256 what its K-quants need; a pruned FFN width neither divides leaves the
FFN's out-projection in F16). The worker times a 512-token prompt in one batch (median of 3) and batch-1 decoding,
with all cores; there is no batch-8 row.

The bound: batch-1 decoding is memory-bound, so it can speed up at most by the ratio of the bytes read per
token, ``read_dense / read_pruned`` (every weight but the input embedding's, which a tied head reads all the same;
the KV cache is small here);
prefill is compute-bound, bounded by the ratio of the blocks' matmul weights. For a whole LLaMA-2-7B, removing
FFN neurons at ratio ``r`` removes ``r * 2/3`` of a block's weights: ``1 / (1 - 2r/3)``, 1.25x at ``r = 0.3``.

``peak_rss_bytes`` is the worker's resident high-water mark (``VmHWM``: interpreter, torch and the model; on
CUDA, ``torch.cuda.max_memory_allocated``). Rows go to ``benchmarks/results/inference_speed_cpu.csv``
(``--csv``; ``--quick``: ``inference_speed_quick.csv``), one group (shape, dtype) at a time: a stopped run
resumes at the first group whose rows (at these ratios, multiples and depth) it has not written.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import DOCS, RESULTS, append_csv, finished_keys, pyplot, run_tags, update_doc_block  # noqa: E402

CSV = RESULTS / "inference_speed_cpu.csv"
PLOT = RESULTS / "inference_speed.png"
RATIOS = (0.1, 0.2, 0.3)
MULTIPLES = (1, 64, 128, 256)
GGUF_MULTIPLES = (1, 32, 256)
QUANTS = ("f16", "q4_k_m")
PROMPT = 512
BATCH_PROMPT = 64
BATCH = 8
PREFILLS = 3  # prefills timed per measurement (their median)


# ---------------------------------------------------------------------------------------------------------------
# The worker: one model, one dtype, one measurement, in a fresh process


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(spec: dict) -> dict:
    """Load ``spec["model"]`` in ``spec["dtype"]`` on ``spec["device"]`` and time prefill and decode."""
    import torch

    from prunenet.dtypes import TORCH_DTYPES
    from prunenet.inference_cost import _prefill_and_decode  # what `prunenet eval --cost` times
    from prunenet.model_size import weight_bytes
    from prunenet.models import load_model

    device = torch.device(spec["device"])
    model, _, _ = load_model(spec["model"], device=str(device), dtype=TORCH_DTYPES[spec["dtype"]])
    model.eval()
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)

    def run(prompt: torch.Tensor, steps: int) -> tuple[float, float]:
        """Seconds of a prefill of ``prompt`` (last position's logits only) and of ``steps`` decode steps."""
        return _prefill_and_decode(model, prompt, steps, device, {"logits_to_keep": 1})

    steps = spec["new_tokens"]
    with torch.inference_mode():
        run(ids[:1, :32], 2)  # warm-up: kernels chosen, threads started, caches allocated
        run(ids[:, :16], 2)
        prefills = [run(ids[:1], 0)[0] for _ in range(PREFILLS - 1)]  # a prefill is short: several, the median
        prefill, decode1 = run(ids[:1], steps)
        prefill = statistics.median([*prefills, prefill])
        _, decode8 = run(ids[:, :BATCH_PROMPT], steps)
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed
    head = model.get_output_embeddings().weight
    total = weight_bytes(model)
    embed_bytes = embed.numel() * embed.element_size()
    # read per decode step: every weight but the embedding table (one row of it is read); a tied head is read
    read = total - embed_bytes + (embed_bytes if tied else 0)
    blocks = total - embed_bytes - (0 if tied else head.numel() * head.element_size())
    return {
        "ffn_width": model.config.intermediate_size,
        "weight_bytes": total,
        "read_bytes": read,
        "block_bytes": blocks,
        "prefill_tok_s": PROMPT / prefill,
        "decode1_tok_s": steps / decode1,
        "decode8_tok_s": BATCH * steps / decode8,
        "peak_rss_bytes": _vm_hwm() if device.type == "cpu" else torch.cuda.max_memory_allocated(device),
    }


def gguf_worker(spec: dict) -> dict:
    """Load the GGUF file ``spec["model"]`` in llama.cpp on the CPU and time a prompt and batch-1 decoding."""
    import gguf
    import numpy as np

    from prunenet import llama_cpp_run

    llm = llama_cpp_run.load(spec["model"], n_ctx=PROMPT + spec["new_tokens"] + 16)
    vocab = llm.n_vocab()
    ids = np.random.default_rng(0).integers(0, vocab, PROMPT).tolist()
    llama_cpp_run.prompt_and_decode(llm, ids[:32], 2)  # warm-up
    prefills = [llama_cpp_run.prompt_and_decode(llm, ids, 0)[0] for _ in range(PREFILLS - 1)]
    prefill, decode = llama_cpp_run.prompt_and_decode(llm, ids, spec["new_tokens"])
    prefill = statistics.median([*prefills, prefill])
    tensors = gguf.GGUFReader(spec["model"]).tensors
    sizes = {t.name: int(t.n_bytes) for t in tensors}
    total, embed, head = sum(sizes.values()), sizes["token_embd.weight"], sizes.get("output.weight", 0)
    ffn_width = next(int(t.shape[0]) for t in tensors if ".ffn_down." in t.name)
    return {
        "ffn_width": ffn_width,
        "weight_bytes": total,
        "read_bytes": total - embed + (embed if head == 0 else 0),  # a tied head reads token_embd in full
        "block_bytes": total - embed - head,
        "prefill_tok_s": PROMPT / prefill,
        "decode1_tok_s": 1 / decode,
        "decode8_tok_s": float("nan"),
        "peak_rss_bytes": _vm_hwm(),
    }


def measure(model: Path, dtype: str, device: str, new_tokens: int, runtime: str = "transformers") -> dict:
    spec = {"model": str(model), "dtype": dtype, "device": device, "new_tokens": new_tokens, "runtime": runtime}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {model} ({dtype}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# The models


def dense_model(shape: str, work: Path, blocks: int) -> Path:
    """The dense model folder of ``shape`` (made once under ``work``)."""
    if shape == "smollm2-135m":
        from prunenet.resolve import resolve_model

        return resolve_model("smollm2-135m")
    from make_checkpoint import make_checkpoint

    folder = work / f"{shape}-{blocks}blocks"
    if not folder.exists():
        make_checkpoint(shape, folder, dtype="bf16", layers=blocks)
    return folder


def pruned_models(dense: Path, ratios, multiples, work: Path, label: str) -> dict[tuple[float, int], Path]:
    """``(ratio, multiple) -> folder``: one ``compress --method magnitude`` per distinct kept width, stored in the
    dense model's dtype (``--dtype auto``) so that both load alike."""
    import transformers

    from prunenet.adapters import get_adapter

    config = transformers.AutoConfig.from_pretrained(dense)
    adapter = get_adapter(config)
    n = adapter.ffn_width(config)
    folders = {}
    for ratio in ratios:
        for multiple in multiples:
            k = adapter.kept_width(ratio, n, multiple)
            folder = work / f"{label}-k{k}"
            if not folder.exists():
                command = [sys.executable, "-m", "prunenet", "compress", "--model", str(dense), "--out", str(folder),
                           "--ratio", str(ratio), "--width-multiple", str(multiple), "--method", "magnitude",
                           "--device", "cpu", "--quiet"]  # fmt: skip
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            folders[(ratio, multiple)] = folder
    return folders


def bpe_view(folder: Path, work: Path) -> Path:
    """``folder`` itself if its tokenizer is a byte-level BPE (what GGUF export writes); otherwise a folder of links
    to its config and weights beside a byte-level BPE tokenizer trained on the embedded text (the synthetic
    checkpoints have a word-level one). The tokenizer does not change the speed: the ids measured are random."""
    from prunenet.gguf_export import is_byte_level_bpe

    if is_byte_level_bpe(json.loads((folder / "tokenizer.json").read_text())):
        return folder
    view = work / f"{folder.name}-bpe"
    if view.exists():
        return view
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from prunenet.text import default_text

    vocab = transformers.AutoConfig.from_pretrained(folder).vocab_size
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # All 256 bytes first where the vocabulary has room for merges beyond them (llama.cpp needs some); otherwise
    # (the tiny shape's 256) only the characters of the text.
    alphabet = pre_tokenizers.ByteLevel.alphabet() if vocab >= 1024 else []
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(specials.values()), show_progress=False,
                                  initial_alphabet=alphabet)  # fmt: skip
    backend.train_from_iterator([default_text("train")], trainer=trainer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{view.name}.", dir=work))
    for item in folder.iterdir():
        if item.suffix in (".json", ".safetensors") and not item.name.startswith("tokenizer"):
            (tmp / item.name).symlink_to(item.resolve())
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(tmp)
    os.replace(tmp, view)
    return view


def gguf_files(folders: dict, quant: str, work: Path) -> dict:
    """``key -> GGUF file``: each folder of ``folders`` exported once (``prunenet export --quant quant``)."""
    files = {}
    for key, folder in folders.items():
        path = work / f"{folder.name}-{quant}.gguf"
        if not path.exists():
            command = [sys.executable, "-m", "prunenet", "export", "--model", str(bpe_view(folder, work)),
                       "--out", str(path), "--quant", quant, "--quiet"]  # fmt: skip
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        files[key] = path
    return files


# ---------------------------------------------------------------------------------------------------------------
# The study


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


GROUP_KEY = ("shape", "runtime", "dtype", "blocks", "ratio", "width_multiple")


def group_keys(shape: str, runtime: str, dtype: str, args) -> set[tuple[str, ...]]:
    """The rows one (shape, runtime, dtype) group writes, as :data:`GROUP_KEY` strings: a group is done when all are
    in the CSV (another run's ratios, multiples or depth do not count)."""
    blocks = str(args.blocks) if shape != "smollm2-135m" else "all"
    multiples = args.gguf_multiples if runtime == "llama.cpp" else args.multiples
    cells = [(0.0, 1)] + [(r, m) for r in args.ratios for m in multiples]
    return {(shape, runtime, dtype, blocks, str(float(r)), str(m)) for r, m in cells}


def run_group(shape: str, runtime: str, dtype: str, dense: Path, pruned: dict, args) -> list[dict]:
    """Every variant of one (shape, runtime, dtype), repeats interleaved; one row per (ratio, multiple), dense
    first. For llama.cpp, ``dense`` and ``pruned`` are GGUF files of type ``dtype``."""
    variants = {"dense": dense, **{str(folder): folder for folder in pruned.values()}}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, folder in variants.items():
            runs[name].append(measure(folder, dtype, args.device, args.new_tokens, runtime))
            print(f"{shape} {runtime} {dtype} repeat {repeat + 1}/{args.repeats} {folder.name}: "
                  f"{runs[name][-1]['decode1_tok_s']:.2f} tok/s (decode, batch 1)", flush=True)  # fmt: skip

    def medians(name: str) -> dict:
        first = runs[name][0]
        keys = ("prefill_tok_s", "decode1_tok_s", "decode8_tok_s", "peak_rss_bytes")
        return {**first, **{key: statistics.median(r[key] for r in runs[name]) for key in keys}}

    base = medians("dense")
    tags, command = run_tags(args.device), "python benchmarks/inference_speed.py " + shlex.join(sys.argv[1:])
    rows = []
    for (ratio, multiple), folder in [((0.0, 1), dense), *pruned.items()]:
        m = medians("dense" if folder == dense else str(folder))
        rows.append({
            "shape": shape, "runtime": runtime, "dtype": dtype, "ratio": ratio, "width_multiple": multiple,
            "ffn_width": m["ffn_width"], "weight_bytes": m["weight_bytes"],
            "read_removed": round(1 - m["read_bytes"] / base["read_bytes"], 4),
            "decode_bound": round(base["read_bytes"] / m["read_bytes"], 3),
            "prefill_bound": round(base["block_bytes"] / m["block_bytes"], 3),
            "prefill_tok_s": round(m["prefill_tok_s"], 2),
            "decode1_tok_s": round(m["decode1_tok_s"], 3),
            "decode8_tok_s": round(m["decode8_tok_s"], 3) if m["decode8_tok_s"] == m["decode8_tok_s"] else "",
            "prefill_speedup": round(m["prefill_tok_s"] / base["prefill_tok_s"], 3),
            "decode1_speedup": round(m["decode1_tok_s"] / base["decode1_tok_s"], 3),
            "decode8_speedup": round(m["decode8_tok_s"] / base["decode8_tok_s"], 3)
            if m["decode8_tok_s"] == m["decode8_tok_s"] else "",
            "peak_rss_bytes": int(m["peak_rss_bytes"]),
            "repeats": args.repeats, "new_tokens": args.new_tokens, "blocks": args.blocks if shape != "smollm2-135m"
            else "all", "machine": machine(), "command": command, **tags,
        })  # fmt: skip
    return rows


def study(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    done = finished_keys(args.csv, GROUP_KEY)
    groups = [("transformers", dtype) for dtype in args.dtypes] * ("transformers" in args.runtimes)
    groups += [("llama.cpp", quant) for quant in args.quants] * ("llama.cpp" in args.runtimes)
    for shape in args.shapes:
        todo = [(runtime, dtype) for runtime, dtype in groups if not group_keys(shape, runtime, dtype, args) <= done]
        if not todo:
            continue
        dense = dense_model(shape, work, args.blocks)
        for runtime, dtype in todo:
            multiples = args.gguf_multiples if runtime == "llama.cpp" else args.multiples
            pruned = pruned_models(dense, args.ratios, multiples, work, f"{shape}-{args.blocks}")
            if runtime == "llama.cpp":
                files = gguf_files({"dense": dense, **pruned}, dtype, work)
                rows = run_group(shape, runtime, dtype, files.pop("dense"), files, args)
            else:
                rows = run_group(shape, runtime, dtype, dense, pruned, args)
            append_csv(args.csv, rows)
            print(f"wrote {len(rows)} rows of {shape} {runtime} {dtype} to {args.csv}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Report


def report(path: Path) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    from prunenet.tables import markdown_table

    # One line per measured width: the (ratio, multiple) cells that reach the same width share a measurement.
    merged: dict[tuple, list[dict]] = {}
    for r in rows:
        if float(r["ratio"]) > 0:
            merged.setdefault((r["shape"], r["runtime"], r["dtype"], r["ratio"], r["ffn_width"]), []).append(r)
    table = []
    for (shape, runtime, dtype, ratio, width), cell in merged.items():
        r = cell[0]
        table.append([
            shape, runtime, dtype, ratio, ", ".join(c["width_multiple"] for c in cell), width,
            f"{100 * float(r['read_removed']):.1f} %",
            f"{r['prefill_speedup']}x (bound {r['prefill_bound']}x)",
            f"{r['decode1_speedup']}x (bound {r['decode_bound']}x)",
            f"{r['decode8_speedup']}x" if r["decode8_speedup"] else "-",
            f"{int(r['weight_bytes']) / 2**20:.0f} MiB", f"{int(r['peak_rss_bytes']) / 2**20:.0f} MiB",
        ])  # fmt: skip
    dense = {(r["shape"], r["runtime"], r["dtype"]): r for r in rows if float(r["ratio"]) == 0}
    header = ["model", "runtime", "dtype", "ratio", "`--width-multiple`", "FFN width", "weights read per token removed",
              "prefill (512 tokens)", "decode, batch 1", "decode, batch 8", "weights", "peak RSS"]  # fmt: skip
    lines = [markdown_table(header, table), "", "Dense, for reference (tokens/s):", ""]
    lines += [f"* {s} in {rt}, {d}: prefill {r['prefill_tok_s']}, decode batch 1 {r['decode1_tok_s']}"
              + (f", batch 8 {r['decode8_tok_s']}" if r["decode8_tok_s"] else "")
              + f"; weights {int(r['weight_bytes']) / 2**20:.0f} MiB, peak RSS "
              f"{int(r['peak_rss_bytes']) / 2**20:.0f} MiB" for (s, rt, d), r in dense.items()]  # fmt: skip
    first = rows[0]
    commands = ", ".join(f"`{c}`" for c in dict.fromkeys(r["command"].strip() for r in rows))
    lines += ["", f"Machine: {first['machine']}; torch {first['torch']}; {first['repeats']} interleaved repeats, "
              f"medians; commands: {commands}."]  # fmt: skip
    update_doc_block("inference-speed", "\n".join(lines), DOCS / "results.md")
    plt = pyplot("benchmarks/inference_speed.py")
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    panels = [("decode1_speedup", "decode, batch 1"), ("prefill_speedup", "prefill, 512 tokens")]
    for ax, (key, title) in zip(axes, panels, strict=True):
        bound = "decode_bound" if key.startswith("decode") else "prefill_bound"
        removed = {id(r): 1 - 1 / float(r[bound]) for r in rows}  # decode: of the bytes read; prefill: of the blocks'
        for shape, runtime, dtype in dense:
            sel = [r for r in rows if (r["shape"], r["runtime"], r["dtype"]) == (shape, runtime, dtype)]
            marker = "o" if runtime == "transformers" else "s"
            ax.plot([100 * removed[id(r)] for r in sel], [float(r[key]) for r in sel], marker,
                    label=f"{shape} {runtime} {dtype}")  # fmt: skip
        xs = sorted(removed.values())
        ax.plot([x * 100 for x in xs], [1 / (1 - x) for x in xs], "k--", label="bound 1 / (1 - removed)")
        ax.set_title(title)
        ax.set_xlabel("weights removed (%): read per token (decode), of the blocks (prefill)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speed-up over dense")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    print(f"wrote {PLOT}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama2-7b"],
                        choices=["smollm2-135m", "llama2-7b", "tiny"], help="models to measure")  # fmt: skip
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--multiples", nargs="+", type=int, default=list(MULTIPLES), help="--width-multiple values")
    parser.add_argument("--runtimes", nargs="+", default=["transformers", "llama.cpp"],
                        choices=["transformers", "llama.cpp"], help="where the models run")  # fmt: skip
    parser.add_argument("--quants", nargs="+", default=list(QUANTS), choices=["f16", "q8_0", "q4_k_m"],
                        help="GGUF types measured in llama.cpp")  # fmt: skip
    parser.add_argument("--gguf-multiples", nargs="+", type=int, default=list(GGUF_MULTIPLES),
                        help="--width-multiple values of the llama.cpp rows")  # fmt: skip
    parser.add_argument("--blocks", type=int, default=2, help="decoder blocks of the LLaMA-2-7B-shaped model")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--csv", type=Path, default=CSV)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "prunenet-inference-speed"),
                        help="where the dense and pruned models are written (reused by a later run)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the embedded model, fp32, ratio 0.3, 2 repeats")
    parser.add_argument("--report", action="store_true", help="only the docs table and the plot, from --csv")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps((gguf_worker if spec.get("runtime") == "llama.cpp" else worker)(spec)), flush=True)
        return 0
    if args.quick:
        args.shapes, args.dtypes, args.ratios, args.repeats = ["smollm2-135m"], ["fp32"], [0.3], 2
        args.quants = ["f16"]
        if args.csv == CSV:  # a quick look never stands in for the study's rows
            args.csv = RESULTS / "inference_speed_quick.csv"
    if not args.report:
        study(args)
    if args.csv == CSV:
        report(args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
