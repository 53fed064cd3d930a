"""How much self-generated probe text ``selfcal`` needs: quality and cost per probe budget.

    python benchmarks/probe_budget.py                       # embedded model, ratio 0.2, seeds 0-2
    python benchmarks/probe_budget.py --budgets 8x128 16x256 --seeds 0 1 2 3 4

For each probe budget (sequences x tokens) and seed: the time of probe generation and of the statistics
pass, and the perplexity of the pruned model on two held-out texts (the quality report's: ``pre1900``
and ``post1900``, the first ``--max-tokens`` tokens, 512-token windows). Each selection prunes a copy of
the model loaded once. Rows: ``benchmarks/results/probe_budget.csv``; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_csv, cell, run_tags  # noqa: E402

from prunenet.adapters import get_adapter  # noqa: E402
from prunenet.config import kept_width  # noqa: E402
from prunenet.models import load_model  # noqa: E402
from prunenet.perplexity import perplexity  # noqa: E402
from prunenet.selfcal import selfcal_keeps  # noqa: E402
from prunenet.slicing import slice_model_  # noqa: E402
from prunenet.tables import markdown_table  # noqa: E402
from prunenet.text import load_text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--budgets", nargs="+", default=["4x64", "8x64", "8x128", "16x128", "8x256"],
                        help="probe budgets SEQUENCESxTOKENS")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--texts", nargs="+", default=["pre1900", "post1900"], help="sotu splits to evaluate on")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--csv", default=str(RESULTS / "probe_budget.csv"))
    args = parser.parse_args(argv)

    model, tokenizer, _ = load_model(args.model)
    adapter = get_adapter(model.config)
    k = kept_width(args.ratio, adapter.ffn_width(model.config))
    texts = {name: load_text(split=name) for name in args.texts}
    rows = []
    for budget in args.budgets:
        sequences, length = (int(x) for x in budget.split("x"))
        for seed in args.seeds:
            timings: dict[str, float] = {}
            keeps = selfcal_keeps(model, k, seed=seed, sequences=sequences, length=length, timings=timings)
            pruned = copy.deepcopy(model)
            slice_model_(pruned, adapter, keeps, progress=False)
            row = {**run_tags("cpu"), "model": args.model, "ratio": args.ratio, "budget": budget, "seed": seed,
                   "probe_s": round(timings["probe_s"], 2), "stats_s": round(timings["stats_s"], 2)}  # fmt: skip
            for name, text in texts.items():
                r = perplexity(pruned, tokenizer, text, max_tokens=args.max_tokens, context=512, progress=False)
                row[f"ppl_{name}"] = round(r["perplexity"], 3)
            print(row, flush=True)
            rows.append(row)
            del pruned
    append_csv(Path(args.csv), rows)
    table = []
    for budget in args.budgets:
        mine = [r for r in rows if r["budget"] == budget]
        table.append([budget, *(cell([r[f"ppl_{t}"] for r in mine]) for t in args.texts),
                      f"{statistics.median(r['probe_s'] for r in mine):.1f} s",
                      f"{statistics.median(r['stats_s'] for r in mine):.1f} s"])  # fmt: skip
    headers = ["probes (sequences x tokens)", *(f"perplexity `{t}`" for t in args.texts), "probe generation",
               "statistics"]  # fmt: skip
    print(markdown_table(headers, table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
