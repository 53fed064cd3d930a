"""Command line: argument parsing only; each subcommand calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from . import __version__

EPILOG = "Run `prunenet COMMAND --help` for the flags of a command."


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
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
        "smaller model, its tokenizer, the policy and a prunenet.json manifest to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model to prune: '{DEFAULT_MODEL}' (the embedded SmolLM2-135M), a local Hugging Face folder, "
        "or a hub id (needs network)",
    )
    c.add_argument("--ratio", type=float, required=True, help="fraction of FFN neurons to remove, in [0, 1)")
    c.add_argument("--out", required=True, help="output folder; must be empty or absent (see --overwrite)")
    c.add_argument(
        "--method",
        default="prunenet",
        choices=["prunenet", "random", "magnitude"],
        help="how neurons are chosen: the learned policy, uniformly at random (seeded), or largest L2 norm "
        "of the state-matrix rows",
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
    c.add_argument("--device", default=_default_device(), help="torch device for the model and training")
    c.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weight dtype to load and save")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically, at the end)")
    c.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser(
        "eval",
        help="perplexity of a model on real text",
        description="Perplexity over the first --max-tokens tokens of a text, in non-overlapping --context-token "
        "windows. The default text is the held-out split of the embedded State of the Union corpus.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument(
        "--model", required=True, help=f"a folder written by compress, any local HF folder, or '{DEFAULT_MODEL}'"
    )
    e.add_argument("--text-file", default=None, help="UTF-8 text file to evaluate on (default: embedded held-out text)")
    e.add_argument("--max-tokens", type=int, default=4096, help="tokens of text to evaluate")
    e.add_argument("--context", type=int, default=512, help="window length in tokens")
    e.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    e.add_argument("--device", default=_default_device(), help="torch device")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weight dtype")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _run_compress(args) -> dict:
    from .pipeline import compress

    result = compress(
        model=args.model,
        ratio=args.ratio,
        out=args.out,
        method=args.method,
        episodes=args.episodes,
        policy=args.policy,
        selection=args.selection,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        kl_weight=args.kl,
        lr=args.lr,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    summary = {
        "out": str(result.out),
        "model_type": result.model_type,
        "ffn_width_before": result.ffn_width,
        "ffn_width_after": result.k,
        "params_before": result.params_before,
        "params_after": result.params_after,
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
                ("time: slicing", f"{t['slice_s']:.2f} s"),
                ("time: saving", f"{t['save_s']:.1f} s"),
            ]
        )
    )
    return summary


def _run_eval(args) -> dict:
    from .evaluate import perplexity
    from .models import load_model
    from .pipeline import DTYPES
    from .text import load_text

    text = load_text(args.text_file)
    model, tokenizer, path = load_model(args.model, device=args.device, dtype=DTYPES[args.dtype])
    result = perplexity(
        model,
        tokenizer,
        text,
        max_tokens=args.max_tokens,
        context=args.context,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
    )
    result["model"] = str(path)
    print(
        _table(
            [
                ("model", str(path)),
                ("perplexity", f"{result['perplexity']:.3f}"),
                ("tokens", f"{result['tokens']} in {result['windows']} windows of {result['context']}"),
                ("parameters", f"{result['parameters']:,}"),
                ("time", f"{result['seconds']:.1f} s"),
            ]
        )
    )
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``prunenet`` and ``python -m prunenet``; returns the exit status."""
    from .models import ModelLoadError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="prunenet: %(message)s")
    run = {"compress": _run_compress, "eval": _run_eval}[args.command]
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError, ModelLoadError) as err:
        # Bad input and unusable models get one clear line, not a traceback.
        print(f"prunenet {args.command}: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    return 0
