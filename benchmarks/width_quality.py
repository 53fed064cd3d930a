"""What ``--width-multiple`` costs in quality: held-out perplexity of the default method at rounded widths.

    python benchmarks/width_quality.py --model smollm2-135m
    python benchmarks/width_quality.py --model ~/.cache/prunenet/gemma-3-270m --name gemma-3-270m
    python benchmarks/width_quality.py --report        # only the docs table, from the CSV

For each seed the model runs forward once on its own probes (``selfcal``'s default 8 x 128 tokens) and every
FFN's ``H = sum_t h_t h_t^T`` is accumulated; for every ratio and width multiple the kept width is
``adapter.kept_width(ratio, n, multiple)`` (what ``--width-multiple`` gives), the neurons are ``selfcal``'s
choice at that width and the kept columns are refitted as ``--compensate`` does (dampening 1): the shipped
default, run as a mask on the dense model (``benchmarks/compensation_study.py``'s ``Masker``; slicing gives the
same numbers, ``benchmarks/selection_study.py`` checks it). Perplexity is measured on the two held-out texts of
the compensation study (``sotu``: the embedded corpus's ``eval`` split; ``pydoc``: Python's documentation),
which no probe saw. Widths reached by several (ratio, multiple) cells are measured once. Every finished row is
appended to ``benchmarks/results/width_quality.csv`` at once and skipped when the run is started again.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

from prunenet.adapters import get_adapter
from prunenet.compensation import compensated_columns
from prunenet.models import load_model
from prunenet.perplexity import perplexity
from prunenet.probes import self_probes
from prunenet.selfcal import selfcal_keeps, top_k
from prunenet.tables import markdown_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, RESULTS, append_csv, finished_keys, run_tags, update_doc_block  # noqa: E402
from compensation_study import TEXTS, Masker, eval_texts, grams  # noqa: E402

CSV = RESULTS / "width_quality.csv"
KEY = ("model", "seed", "ratio", "width_multiple")
DAMPING = 1.0  # PruneConfig.damping


def run(args) -> None:
    torch.manual_seed(0)
    model, tokenizer, _ = load_model(args.model)
    adapter = get_adapter(model.config)
    width = adapter.ffn_width(model.config)
    texts, masker, done, tags = eval_texts(), Masker(model), finished_keys(CSV, KEY), run_tags()

    def measure() -> dict:
        tick = time.perf_counter()
        row = {}
        for name in TEXTS:
            ppl = perplexity(model, tokenizer, texts[name], max_tokens=args.max_tokens, context=512, progress=False)
            row[f"ppl_{name}"] = round(ppl["perplexity"], 3)
        row["eval_s"] = round(time.perf_counter() - tick, 1)
        return row

    def write(key: dict, measured: dict) -> None:
        row = {**key, **measured, **tags}
        append_csv(CSV, [row])
        done.add(tuple(str(key[k]) for k in KEY))
        print(", ".join(f"{k}={v}" for k, v in row.items() if k not in tags), flush=True)

    dense_key = {"model": args.name, "seed": 0, "ratio": 0.0, "width_multiple": 1, "k": width, "n": width}
    if tuple(str(dense_key[k]) for k in KEY) not in done:
        write(dense_key, measure())
    for seed in args.seeds:
        keys = [{"model": args.name, "seed": seed, "ratio": r, "width_multiple": m,
                 "k": adapter.kept_width(r, width, m), "n": width}
                for r in args.ratios for m in args.multiples]  # fmt: skip
        keys = [key for key in keys if tuple(str(key[k]) for k in KEY) not in done]
        if not keys:
            continue
        ids = self_probes(model, sequences=args.probes[0], length=args.probes[1], seed=seed)
        hs = grams(model, ids)
        tokens = ids.numel()
        norms = [p.detach().double().norm(dim=0) for p in masker.dense]  # (n,) per layer
        by_width: dict[int, dict] = {}
        for key in keys:
            k = key["k"]
            if k not in by_width:
                keeps = [top_k((h.diagonal() / tokens).sqrt() * norm, k) for h, norm in zip(hs, norms, strict=True)]
                if not by_width:  # the study's choice is the shipped selector's
                    shipped = selfcal_keeps(model, k, ids=ids)
                    assert all(torch.equal(a, b) for a, b in zip(keeps, shipped, strict=True))
                columns = [compensated_columns(h, w, keep, DAMPING)
                           for h, w, keep in zip(hs, masker.dense, keeps, strict=True)]  # fmt: skip
                masker.apply(keeps, columns)
                by_width[k] = measure()
                masker.restore()
            write(key, by_width[k])
        del hs


# ---------------------------------------------------------------------------------------------------------------
# Report


def report() -> None:
    with open(CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], float(row["ratio"]), int(row["width_multiple"])), []).append(row)
    table, seen = [], set()
    for (model, ratio, multiple), cell in sorted(groups.items()):
        k = cell[0]["k"]
        if ratio == 0 or (model, ratio, k) in seen:  # cells that reach the same width: one line
            continue
        seen.add((model, ratio, k))
        same = [m for (mo, r, m), c in sorted(groups.items()) if (mo, r) == (model, ratio) and c[0]["k"] == k]
        exact = groups[(model, ratio, 1)]
        cells = [model, ratio, ", ".join(map(str, same)), f"{cell[0]['n']} -> {k}"]
        for text in TEXTS:
            med = statistics.median(float(r[f"ppl_{text}"]) for r in cell)
            base = statistics.median(float(r[f"ppl_{text}"]) for r in exact)
            cells.append(f"{med:.2f}" + ("" if multiple == 1 else f" ({100 * (med / base - 1):+.1f} %)"))
        cells.append(len(cell))
        table.append(cells)
    dense = {r["model"]: r for r in rows if float(r["ratio"]) == 0}
    header = ["model", "ratio", "`--width-multiple`", "FFN width", "`sotu` perplexity (vs multiple 1)",
              "`pydoc` perplexity (vs multiple 1)", "seeds"]  # fmt: skip
    lines = [markdown_table(header, table), ""]
    dense_text = "; ".join(f"{m} `sotu` {r['ppl_sotu']}, `pydoc` {r['ppl_pydoc']}" for m, r in dense.items())
    lines.append(f"Dense: {dense_text}. Medians over the seeds; `selfcal` with `--compensate` (the defaults), "
                 "8 x 128 self-generated probe tokens; command: "
                 "`python benchmarks/width_quality.py --model M`.")  # fmt: skip
    update_doc_block("width-quality", "\n".join(lines), DOCS / "results.md")
    print(f"updated the width-quality block of {DOCS / 'results.md'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a model folder or the embedded model's name")
    parser.add_argument("--name", default=None, help="the model's name in the CSV (default: --model)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 64, 128, 256])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--probes", type=int, nargs=2, default=[8, 128], metavar=("SEQUENCES", "LENGTH"))
    parser.add_argument("--max-tokens", type=int, default=2048, help="evaluated tokens of each held-out text")
    parser.add_argument("--report", action="store_true", help="only write the docs table from the CSV")
    args = parser.parse_args(argv)
    args.name = args.name or args.model
    if not args.report:
        run(args)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
