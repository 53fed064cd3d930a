"""Command line: argument parsing, and the one error boundary; each subcommand calls library functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys

import torch

from . import __version__

EPILOG = "Run `prunenet COMMAND --help` for the flags of a command."

OVERWRITE_HELP = (
    "replace an existing --out, but only a folder prunenet wrote: one whose prunenet.json lists every file in "
    "it. It never deletes anything else: a folder holding other files is refused, and so is an --out that is, "
    "contains or lies inside the source model or a cache, or is the current folder, a parent of it, or your home. "
    "The old output is removed only once the new one is complete"
)


class Parser(argparse.ArgumentParser):
    """``argparse`` with errors in one line (``prog: error: ...``) and exit code 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    parser = Parser(
        prog="prunenet",
        description="Calibration-free structured pruning of transformer FFNs (PruneNet, ICLR 2025).",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"prunenet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "compress",
        help="prune the FFN of every block and save a model stock transformers can load",
        description="Train (or reuse) a PruneNet policy on the model's FFN weights, remove the least important "
        "FFN neurons of every block (rows of the in-projections, columns of the out-projection) and save the "
        "smaller model, its tokenizer, the policy and a prunenet.json manifest to --out. Launched by torchrun "
        "(torchrun --nproc-per-node N -m prunenet compress ...), the layers are split across the N processes "
        "(gloo on CPU, NCCL on GPUs) with the same result as one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model to prune: '{DEFAULT_MODEL}' (the embedded SmolLM2-135M), a local Hugging Face folder, "
        "or a hub id (needs network)",
    )
    c.add_argument("--ratio", type=float, required=True, help="fraction of FFN neurons to remove, in [0, 1)")
    c.add_argument(
        "--out",
        required=True,
        help="output folder: absent, empty, or an earlier prunenet output (with --overwrite). It is written beside "
        "it and renamed into place when complete; one run at a time per --out",
    )
    c.add_argument(
        "--method",
        default="prunenet",
        choices=["prunenet", "random", "magnitude", "selfcal"],
        help="how neurons are chosen: the learned policy (the paper), uniformly at random (seeded), largest L2 "
        "norm of the state-matrix rows, or 'selfcal': run the model forward on text it generates itself (no "
        "dataset; seeded) and keep the neurons contributing most to each FFN's output (see the README)",
    )
    c.add_argument("--episodes", type=int, default=20, help="policy-training episodes (prunenet only)")
    c.add_argument(
        "--policy",
        default=None,
        help="reuse a trained policy (a policy.safetensors file or a folder written by compress) instead of "
        "training; the model must have the same (hidden size, FFN width)",
    )
    c.add_argument(
        "--selection",
        default="sample",
        choices=["sample", "topk"],
        help="prunenet only: 'sample' draws the kept rows from the policy's relaxed-Bernoulli scores as in the "
        "paper (seeded); 'topk' keeps the rows of highest keep-probability",
    )
    c.add_argument("--seed", type=int, default=0, help="seed of policy initialisation, training and selection")
    c.add_argument(
        "--kl",
        type=float,
        nargs="?",
        const=1.0,
        default=0.0,
        metavar="WEIGHT",
        help="add the KL(policy || Bernoulli(0.5)) term to the loss with this weight (1.0 if no value)",
    )
    c.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the policy")
    c.add_argument(
        "--reward-backend",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="how each training episode's spectral reward is computed: 'triton' = batched Triton kernels "
        "(CUDA only, needs the triton package), 'torch' = pure PyTorch on any device, 'auto' = triton on a "
        "CUDA device when triton is installed, torch otherwise",
    )
    c.add_argument("--device", default=_default_device(), help="torch device for the model and training")
    c.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="weight dtype to load and save; 'auto' = as the checkpoint stores its FFN weights (streaming always "
        "keeps the stored dtype)",
    )
    c.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--streaming: work on the safetensors checkpoint tensor by tensor without instantiating the model "
        "(bounded memory: about one FFN tensor plus the policy; the output is written shard by shard and a killed "
        "run resumes); --no-streaming: load the whole model. Default: streaming when the folder holds safetensors "
        "weights larger than --max-memory. Both give the same output for a seed",
    )
    c.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="memory budget for --device, e.g. 4GiB, 512MiB or 3GB (default: what the device has free now). "
        "It decides streaming (see --streaming) and, when streaming, whether the state matrices and W^T W "
        "matrices of the reward stay in memory or are re-read from disk each episode (the log states the plan)",
    )
    c.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    c.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    c.add_argument("--quiet", action="store_true", help="no progress bars (also off when stderr is not a terminal)")
    c.add_argument(
        "--modules",
        default="ffn",
        choices=["ffn", "ffn+attn"],
        help="what to prune: the FFN only (the paper's default), or also whole key/value head groups of the "
        "attention at the same ratio (llama/mistral/qwen2/qwen3/gemma families; costs much more quality, see "
        "README)",
    )

    e = sub.add_parser(
        "eval",
        help="perplexity, zero-shot accuracy and inference cost of a model",
        description="Perplexity over the first --max-tokens tokens of a text, in --context-token windows "
        "(non-overlapping, or sliding with --stride). The default text is the held-out split of the embedded State "
        "of the Union corpus. Optionally zero-shot multiple-choice accuracy through lm-eval (--tasks) and the "
        "inference cost (--cost), side by side with a --baseline model (e.g. the dense one).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument(
        "--model", required=True, help=f"a folder written by compress, any local HF folder, or '{DEFAULT_MODEL}'"
    )
    e.add_argument(
        "--baseline",
        default=None,
        help="a second model (e.g. the dense source of a pruned --model) measured the same way and shown side by "
        "side, with the ratio model/baseline",
    )
    e.add_argument("--text-file", default=None, help="UTF-8 text file to evaluate on (default: embedded held-out text)")
    e.add_argument("--max-tokens", type=int, default=4096, help="tokens of text to evaluate")
    e.add_argument("--context", type=int, default=512, help="window length in tokens")
    e.add_argument(
        "--stride",
        type=int,
        default=None,
        help="step between window starts (default: --context, non-overlapping windows); a smaller stride gives "
        "every scored token at least context - stride tokens of context, at context/stride times the cost",
    )
    e.add_argument("--batch-size", type=int, default=4, help="windows (or lm-eval requests) per forward pass")
    e.add_argument("--no-perplexity", action="store_true", help="skip perplexity (e.g. with --tasks or --cost only)")
    e.add_argument(
        "--tasks",
        default=None,
        help="zero-shot multiple-choice accuracy through lm-eval: comma-separated lm-eval task names, or 'paper' "
        "for the paper's PIQA, HellaSwag, ARC-easy, ARC-challenge, WinoGrande (acc_norm; WinoGrande acc). Needs "
        "`pip install 'prunenet[eval]'` and the datasets: the Hugging Face Hub, a datasets cache, or --tasks-dir",
    )
    e.add_argument(
        "--tasks-dir",
        default=None,
        help="folder of lm-eval task YAMLs (lm-eval's --include_path), e.g. tasks reading local JSON/JSONL copies "
        "of the datasets with `dataset_path: json`",
    )
    e.add_argument("--limit", type=int, default=None, help="only the first N examples of each task (quick checks)")
    e.add_argument(
        "--cost",
        action="store_true",
        help="measure inference cost in a fresh process per model: parameters, weight bytes, prefill and decode "
        "tokens/s, peak memory (CPU: peak resident set; CUDA: max_memory_allocated)",
    )
    e.add_argument("--cost-prompt-tokens", type=int, default=512, help="--cost: prompt length of the prefill")
    e.add_argument("--cost-new-tokens", type=int, default=64, help="--cost: greedy decode steps (KV cache)")
    e.add_argument("--cost-batch-size", type=int, default=1, help="--cost: sequences per batch")
    e.add_argument("--cost-repeats", type=int, default=3, help="--cost: timed runs (median) after one warm-up")
    e.add_argument("--device", default=_default_device(), help="torch device")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weight dtype")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    e.add_argument("--quiet", action="store_true", help="no progress bars (also off when stderr is not a terminal)")
    f = _add_finetune_parser(sub)
    for command in (c, e, f):
        command.add_argument(
            "--debug", action="store_true", help="on an error, show the full Python traceback instead of one line"
        )
    return parser


def _add_finetune_parser(sub) -> argparse.ArgumentParser:
    from .finetune import FinetuneConfig

    d = FinetuneConfig()
    f = sub.add_parser(
        "finetune",
        help="recovery fine-tuning (LoRA, merged) of a pruned model",
        description="Train LoRA adapters (peft; `pip install 'prunenet[finetune]'`) on the FFN and attention "
        "projections of a (pruned) model on real text, with early stopping on a held-out tail of that text, merge "
        "them into the weights and save a model stock transformers loads at the same (pruned) width. The default "
        "text is the 'train' split of the embedded State of the Union corpus (speeches before 1990), disjoint from "
        "the held-out 'eval' split (1990 on) that `prunenet eval` uses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    f.add_argument("--model", required=True, help="the model to fine-tune: a folder written by compress, or any model")
    f.add_argument(
        "--out", required=True, help="output folder: absent, empty, or an earlier prunenet output (with --overwrite)"
    )
    f.add_argument("--text-file", default=None, help="UTF-8 training text (default: the embedded 'train' split)")
    f.add_argument("--steps", type=int, default=d.steps, help="optimizer steps at most (early stopping may end sooner)")
    f.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank")
    f.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA alpha (updates scaled by alpha/r)")
    f.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA adapters' input")
    f.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (linear warm-up, then linear decay)")
    f.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="steps of linear learning-rate warm-up")
    f.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training window")
    f.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per micro-batch")
    f.add_argument(
        "--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step (gradient accumulation)"
    )
    f.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validation losses")
    f.add_argument(
        "--patience", type=int, default=d.patience, help="stop after this many validations without improvement"
    )
    f.add_argument(
        "--holdout-tokens",
        type=int,
        default=d.holdout_tokens,
        help="tokens at the end of the training text held out for the validation loss (never trained on)",
    )
    f.add_argument(
        "--eval-tokens",
        type=int,
        default=2048,
        help="measure perplexity before and after on this many tokens of the held-out 'eval' split (0: skip)",
    )
    f.add_argument("--seed", type=int, default=d.seed, help="seed of the window order, LoRA init and dropout")
    f.add_argument("--device", default=_default_device(), help="torch device")
    f.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weight dtype to train and save")
    f.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    f.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    f.add_argument("--quiet", action="store_true", help="no progress bar (also off when stderr is not a terminal)")
    return f


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _run_compress(args) -> dict:
    from . import distributed
    from .pipeline import compress

    # Under torchrun: join the process group (gloo on CPU, NCCL on GPU LOCAL_RANK); else a no-op.
    dist, device = distributed.init(args.device)
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one rank reports
    try:
        result = compress(
            model=args.model,
            ratio=args.ratio,
            out=args.out,
            method=args.method,
            episodes=args.episodes,
            policy=args.policy,
            selection=args.selection,
            seed=args.seed,
            device=device,
            dtype=args.dtype,
            kl_weight=args.kl,
            lr=args.lr,
            reward_backend=args.reward_backend,
            modules=args.modules,
            overwrite=args.overwrite,
            progress=not args.quiet and dist.is_main,
            streaming=args.streaming,
            max_memory=args.max_memory,
            dist=dist,
        )
    finally:
        distributed.shutdown(dist)
    if not dist.is_main:
        args.json = False
        return {}
    return _compress_summary(result)


def _compress_summary(result) -> dict:
    """Print the result table; return the summary ``--json`` prints."""
    summary = {
        "out": str(result.out),
        "model_type": result.model_type,
        "ffn_width_before": result.ffn_width,
        "ffn_width_after": result.k,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "streaming": result.streaming,
        **{key: round(value, 3) for key, value in result.timings.items()},
    }
    t = result.timings
    print(
        _table(
            [
                ("output", str(result.out)),
                ("model type", result.model_type),
                ("FFN width", f"{result.ffn_width} -> {result.k}"),
                (
                    "parameters",
                    f"{result.params_before:,} -> {result.params_after:,} "
                    f"({100 * (1 - result.params_after / result.params_before):.1f}% fewer)",
                ),
                ("time: load", f"{t['load_s']:.1f} s"),
                ("time: training", f"{t['train_s']:.1f} s" if "train_s" in t else "-"),
                ("time: slicing", f"{t['slice_s']:.2f} s" if not result.streaming else "(streamed: while saving)"),
                ("time: saving", f"{t['save_s']:.1f} s" + (" (slicing included)" if result.streaming else "")),
            ]
        )
    )
    return summary


def _evaluate_one(args, spec: str, text: str | None, tasks: list[str] | None) -> dict:
    """Every measurement ``eval`` was asked for, on one model; the model is freed before returning."""
    import gc

    from .evaluate import count_parameters, inference_cost_subprocess, perplexity, zero_shot
    from .models import load_model
    from .pipeline import DTYPES

    result: dict = {"model": spec}
    if text is not None or tasks:
        model, tokenizer, path = load_model(spec, device=args.device, dtype=DTYPES[args.dtype])
        result["model"] = str(path)
        result["parameters"] = count_parameters(model)
        if tasks:  # before perplexity: an unreachable dataset should fail fast
            result["zero_shot"] = zero_shot(
                model,
                tokenizer,
                tasks,
                tasks_dir=args.tasks_dir,
                limit=args.limit,
                batch_size=args.batch_size,
                progress=not args.quiet,
            )
        if text is not None:
            result.update(
                perplexity(
                    model,
                    tokenizer,
                    text,
                    max_tokens=args.max_tokens,
                    context=args.context,
                    stride=args.stride,
                    batch_size=args.batch_size,
                    device=args.device,
                    progress=not args.quiet,
                )
            )
        del model, tokenizer
        gc.collect()  # before the next model: keep one model in memory at a time
    if args.cost:
        result["cost"] = inference_cost_subprocess(
            spec,
            text_file=args.text_file,
            dtype=args.dtype,
            device=args.device,
            prompt_tokens=args.cost_prompt_tokens,
            new_tokens=args.cost_new_tokens,
            batch_size=args.cost_batch_size,
            repeats=args.cost_repeats,
            progress=not args.quiet,
        )
        result.setdefault("parameters", result["cost"]["parameters"])
    return result


def _eval_rows(r: dict) -> list[tuple[str, str, float | None]]:
    """``(label, shown value, number for ratios or None)`` for every measurement in one ``eval`` result."""
    mib = 2**20
    rows: list[tuple[str, str, float | None]] = []
    if "perplexity" in r:
        rows.append(("perplexity", f"{r['perplexity']:.3f}", r["perplexity"]))
    zs = r.get("zero_shot")
    if zs:
        for name, t in zs["tasks"].items():
            err = f" ± {100 * t['stderr']:.2f}" if t["stderr"] is not None else ""
            rows.append((f"{name} {t['metric']} (%)", f"{100 * t['value']:.2f}{err}", t["value"]))
        rows.append((f"zero-shot average of {len(zs['tasks'])} (%)", f"{100 * zs['average']:.2f}", zs["average"]))
        rows += [(name, "dataset unavailable (see above)", None) for name in zs["unavailable"]]
    rows.append(("parameters", f"{r['parameters']:,}", r["parameters"]))
    c = r.get("cost")
    if c:
        rows += [
            ("weight bytes (MiB)", f"{c['weight_bytes'] / mib:.1f}", c["weight_bytes"]),
            (f"prefill tokens/s ({c['batch_size']}x{c['prompt_tokens']})", f"{c['prefill_tokens_per_s']:.1f}",
             c["prefill_tokens_per_s"]),
            (f"decode tokens/s ({c['new_tokens']} steps)", f"{c['decode_tokens_per_s']:.1f}", c["decode_tokens_per_s"]),
            ("peak memory (MiB)", f"{c['peak_memory_bytes'] / mib:.1f}", c["peak_memory_bytes"]),
            ("peak memory above weights+runtime (MiB)", f"{c['peak_extra_bytes'] / mib:.1f}", c["peak_extra_bytes"]),
        ]  # fmt: skip
    if "perplexity" in r:
        rows.append(("tokens", f"{r['tokens']} scored, {r['windows']} windows of {r['context']} "
                     f"(stride {r['stride']})", None))  # fmt: skip
        rows.append(("time: perplexity", f"{r['seconds']:.1f} s", None))
    if zs:
        rows.append(("time: zero-shot", f"{zs['seconds']:.1f} s", None))
    return rows


def _check_eval_args(args) -> None:
    """Every ``eval`` count flag, before any model is loaded."""
    from .evaluate import check_cost_options
    from .validate import check_count, check_device

    check_device(args.device)
    check_count("--max-tokens", args.max_tokens)
    check_count("--context", args.context, minimum=2)
    if args.stride is not None:
        check_count("--stride", args.stride, maximum=args.context)
    check_count("--batch-size", args.batch_size)
    if args.limit is not None:
        check_count("--limit", args.limit)
    check_cost_options(args.cost_prompt_tokens, args.cost_new_tokens, args.cost_batch_size, args.cost_repeats)
    if args.no_perplexity and not args.tasks and not args.cost:
        raise ValueError("--no-perplexity leaves nothing to measure; add --tasks and/or --cost")


def _run_eval(args) -> dict:
    from .evaluate import resolve_tasks
    from .tables import format_table
    from .text import load_text

    _check_eval_args(args)
    tasks = resolve_tasks(args.tasks) if args.tasks else None
    text = None if args.no_perplexity else load_text(args.text_file)
    result = _evaluate_one(args, args.model, text, tasks)
    if args.baseline is None:
        print(
            format_table(
                None, [("model", result["model"]), *((label, shown) for label, shown, _ in _eval_rows(result))]
            )
        )
        return result
    result["baseline"] = _evaluate_one(args, args.baseline, text, tasks)
    base = {label: (shown, value) for label, shown, value in _eval_rows(result["baseline"])}
    rows = [("model", result["model"], result["baseline"]["model"], "")]
    for label, shown, value in _eval_rows(result):
        base_shown, base_value = base.get(label, ("-", None))
        ratio = f"{value / base_value:.3f}" if value is not None and base_value else ""
        rows.append((label, shown, base_shown, ratio))
    print(format_table(["", "model", "baseline", "model/baseline"], rows, right=[3]))
    return result


def _run_finetune(args) -> dict:
    from .finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        steps=args.steps,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lr=args.lr,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps,
        eval_every=args.eval_every,
        patience=args.patience,
        holdout_tokens=args.holdout_tokens,
        seed=args.seed,
    )
    result = finetune(
        model=args.model,
        out=args.out,
        text_file=args.text_file,
        config=cfg,
        eval_tokens=args.eval_tokens,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    info, t = result.info, result.timings
    ppl = (
        f"{result.perplexity_before:.2f} -> {result.perplexity_after:.2f}"
        if result.perplexity_before is not None
        else "-"
    )
    print(
        _table(
            [
                ("output", str(result.out)),
                ("steps", f"{info['steps_run']} run, best at {info['best_step']}"
                 + (" (stopped early)" if info["stopped_early"] else "")),
                ("validation loss", f"{info['val_loss_before']:.4f} -> {info['best_val_loss']:.4f}"),
                (f"held-out perplexity ({args.eval_tokens} tokens)", ppl),
                ("trainable parameters", f"{info['trainable_parameters']:,}"),
                ("time: training", f"{t['train_s']:.1f} s"),
            ]
        )
    )  # fmt: skip
    return {
        "out": str(result.out),
        "perplexity_before": result.perplexity_before,
        "perplexity_after": result.perplexity_after,
        **{k: info[k] for k in ("steps_run", "best_step", "stopped_early", "val_loss_before", "best_val_loss")},
        **{key: round(value, 3) for key, value in t.items()},
    }


def _one_line(err: BaseException) -> str:
    """The error as one line: what went wrong, and for OS errors which file and why in plain words."""
    from .output import os_error_reason

    if isinstance(err, OSError) and err.errno is not None:
        where = f": {err.filename}" if err.filename else ""
        return f"{os_error_reason(err)}{where}"
    # safetensors and tokenizers (Rust) report OS errors as text: "... (os error 28)".
    rust_io = re.search(r"\(os error (\d+)\)", str(err))
    if rust_io:
        code = int(rust_io.group(1))
        return f"{os_error_reason(OSError(code, os.strerror(code)))} ({' '.join(str(err).split())})"
    if isinstance(err, torch.OutOfMemoryError):
        return "out of device memory; for compress, pass --streaming or a smaller --max-memory (" + (
            " ".join(str(err).split())[:200] + ")"
        )
    return " ".join(str(err).split()) or type(err).__name__


def _anticipated() -> tuple[type[BaseException], ...]:
    """Failures that are about the input or the machine, not bugs: one line and exit code 2."""
    from safetensors import SafetensorError

    from .models import ModelLoadError

    return (ValueError, OSError, ModelLoadError, OverflowError, FloatingPointError, SafetensorError,
            torch.OutOfMemoryError)  # fmt: skip


class Terminated(BaseException):
    """SIGTERM arrived (``kill``, ``timeout``, or ``torchrun`` stopping the survivors of a failed rank).

    A ``BaseException`` like ``KeyboardInterrupt``: it unwinds through every cleanup (temporary output
    removed, lock released) and is caught only by :func:`main`.
    """


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: let the cleanup finish
    raise Terminated()


def _print_json(summary: dict) -> None:
    """The summary as strict JSON: NaN and infinities become ``null`` (with a warning), never ``NaN``."""
    from .checkpoint import strict_json

    clean, replaced = strict_json(summary)
    if replaced:
        logging.getLogger(__name__).warning("--json: not finite, printed as null: %s", ", ".join(replaced))
    print(json.dumps(clean, allow_nan=False))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``prunenet`` and ``python -m prunenet``; returns the exit status.

    The one error boundary: anticipated failures (bad input, unusable models, OS errors on the output,
    numeric trouble) print one line and return 2; Ctrl-C returns 130; ``--debug`` shows the traceback.
    SIGTERM ends the run the way Ctrl-C does (temporary output removed), with status 143.
    """
    from .distributed import DistributedError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version (0), or a usage error (2, already printed in one line)
        return done.code or 0
    logging.basicConfig(level=logging.INFO, format="prunenet: %(message)s")
    # Progress bars only for a person watching: not with --quiet, not into a log file or a pipe.
    args.quiet = args.quiet or not sys.stderr.isatty()
    if args.quiet:
        import huggingface_hub.utils
        import transformers

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    run = {"compress": _run_compress, "eval": _run_eval, "finetune": _run_finetune}[args.command]
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (main() called from a worker thread): leave SIGTERM alone
        previous = None
    try:
        summary = run(args)
    except (KeyboardInterrupt, Terminated) as err:
        if args.debug:
            raise
        what, code = ("terminated", 128 + signal.SIGTERM) if isinstance(err, Terminated) else ("interrupted", 130)
        print(f"prunenet {args.command}: {what} (no partial output is left behind)", file=sys.stderr)
        return code
    except DistributedError as err:  # another rank of a torchrun job failed and said why in its own log
        print(f"prunenet {args.command}: error: {err}", file=sys.stderr)
        return 1
    except _anticipated() as err:
        if args.debug:
            raise
        print(f"prunenet {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if args.json:
        _print_json(summary)
    return 0


def entry() -> None:
    """The ``prunenet`` console script and ``python -m prunenet``: :func:`main`, then exit with its status.

    After Ctrl-C or SIGTERM (status 130 or 143, once the output is cleaned up) the process ends by that
    signal, as the conventions for interrupted programs ask: shells then report 130/143 and a shell loop
    of prunenet runs stops at Ctrl-C instead of going on to the next one. (CPython would sometimes do so
    by itself, when the interrupt landed in code that a library compiled from a string.)
    """
    code = main()
    for status, signum in ((130, signal.SIGINT), (128 + signal.SIGTERM, signal.SIGTERM)):
        if code == status:
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
    sys.exit(code)
