"""Compensation in float32 against float64: the same refitted columns, the same perplexity?

    python benchmarks/compensation_precision.py --model smollm2-135m
    python benchmarks/compensation_precision.py --model ~/.cache/prunenet/gemma-3-270m --name gemma-3-270m

On ``--sequences x --length`` tokens (default 32 x 256) of the embedded corpus's ``train`` split, ``H`` is
accumulated and the update solved (:func:`prunenet.compensation.compensated_columns`) once in float64 and once
in float32, for the shipped
``selfcal`` neurons at each ratio and dampening; the rows give the largest relative difference of the refitted
columns over the layers and the held-out perplexity (``eval`` split, first 2048 tokens) of both.
Results: ``benchmarks/results/compensation_precision.csv``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from prunenet.activations import run_with_hooks
from prunenet.adapters import get_adapter
from prunenet.calibration import calibration_windows, read_calibration
from prunenet.compensation import compensated_columns
from prunenet.models import load_model
from prunenet.perplexity import perplexity
from prunenet.selfcal import top_k
from prunenet.text import SPLITS, load_text, speech_files
from prunenet.widths import kept_width

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_csv, run_tags  # noqa: E402


@torch.no_grad()
def grams(model, ids: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """Per layer, ``H`` ``(n, n)`` in ``dtype`` over every token of ``ids``."""
    adapter = get_adapter(model.config)
    found: dict[int, torch.Tensor] = {}

    def hook_for(layer):
        def hook(module, args):
            h = args[0].detach().reshape(-1, args[0].shape[-1]).to(dtype)
            found[layer] = found.get(layer, 0) + h.t() @ h

        return hook

    run_with_hooks(model, adapter, ids, {i: hook_for(i) for i in range(adapter.num_layers(model.config))})
    return [found[i] for i in range(len(found))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--name", default=None)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--damping", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--sequences", type=int, default=32, help="calibration windows")
    parser.add_argument("--length", type=int, default=256, help="tokens per window")
    args = parser.parse_args()
    model, tokenizer, _ = load_model(args.model)
    adapter = get_adapter(model.config)
    params = [model.get_parameter(adapter.block_prefix(i) + adapter.out_projection.name)
              for i in range(adapter.num_layers(model.config))]  # fmt: skip
    dense = [p.detach().clone() for p in params]
    text = read_calibration(speech_files(SPLITS["train"]))
    ids = calibration_windows(text, tokenizer, args.sequences, args.length, 0).ids
    h64, h32 = grams(model, ids, torch.float64), grams(model, ids, torch.float32)
    norms = [w.double().norm(dim=0) for w in dense]
    text = load_text(None, "eval")
    rows = []
    for ratio in args.ratios:
        k = kept_width(ratio, adapter.ffn_width(model.config))
        keeps = [top_k((h.diagonal() / ids.numel()).sqrt() * norm, k) for h, norm in zip(h64, norms, strict=True)]
        for damping in args.damping:
            row = {"model": args.name or args.model, "ratio": ratio, "damping": damping, "tokens": ids.numel()}
            columns = {}
            for name, hs in (("float64", h64), ("float32", h32)):
                tick = time.perf_counter()
                columns[name] = [compensated_columns(h, w, keep, damping)
                                 for h, w, keep in zip(hs, dense, keeps, strict=True)]  # fmt: skip
                row[f"solve_s_{name}"] = round(time.perf_counter() - tick, 2)
            row["max_rel_diff"] = max(
                ((a - b).norm() / a.norm()).item() for a, b in zip(columns["float64"], columns["float32"], strict=True)
            )
            for name in ("float64", "float32"):
                with torch.no_grad():
                    for param, keep, c in zip(params, keeps, columns[name], strict=True):
                        param.zero_()
                        param[:, keep] = c
                row[f"ppl_{name}"] = round(perplexity(model, tokenizer, text, max_tokens=2048, progress=False)
                                           ["perplexity"], 3)  # fmt: skip
                with torch.no_grad():
                    for param, w in zip(params, dense, strict=True):
                        param.copy_(w)
            print(row, flush=True)
            rows.append({**row, **run_tags()})
    append_csv(RESULTS / "compensation_precision.csv", rows)


if __name__ == "__main__":
    main()
