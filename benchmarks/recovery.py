"""Recovery report: held-out perplexity of the embedded model after pruning and recovery, with and without data.

    python benchmarks/recovery.py                 # the grid below (about 50 min on 2 idle CPU cores)
    python benchmarks/recovery.py --from-csv      # only the table, the plot and the docs block

For each selection (``selfcal``, the paper's ``prunenet``) and ratio (0.1 0.2 0.3, seed 0), the pruned model is
measured as it is and after each recovery, all with the same step budget (``--steps``; the other settings are
``compress --recover``'s, :meth:`prunenet.config.CompressConfig.recovery_config`):

* ``self-distillation``: LoRA trained to match the dense model's top-64 next-token distribution on text the dense
  model generated (no dataset) -- ``prunenet finetune --teacher``. The teacher's text and targets depend only on
  the dense model and the seed, so they are computed once and shared by every row, as each CLI run would
  compute them alike;
* ``real text`` (``selfcal`` only): LoRA on the ``train`` split of the embedded State of the Union corpus --
  ``prunenet finetune`` without ``--teacher``, the recovery that needs a dataset;
* ``self-distillation, full KL`` (``selfcal`` at 0.2): the full-vocabulary KL with the teacher resident
  (``--kd-top-k 0``), to weigh the top-64 approximation's cost and quality.

Perplexity is measured on the first ``--eval-tokens`` tokens of the ``eval`` split (1990 on, 512-token windows),
which neither the selection nor any recovery saw (``prunenet finetune``'s own before/after measurement). Rows go
to ``benchmarks/results/recovery.csv``; the plot to ``recovery.png``; the table to the ``recovery`` block of
the README. Each step runs alone: times are side by side in one process.
"""

from __future__ import annotations

import argparse
import copy
import csv
import resource
import sys
import time
from pathlib import Path

import torch

from prunenet import prune_
from prunenet.adapters import get_adapter
from prunenet.config import CompressConfig
from prunenet.distill import TeacherTargets, teacher_targets
from prunenet.lora import merge_lora
from prunenet.models import load_model
from prunenet.perplexity import perplexity
from prunenet.recovery_training import distill_lora, train_lora
from prunenet.tables import markdown_table
from prunenet.text import load_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, pyplot, run_tags, update_doc_block, write_csv  # noqa: E402

SELECTIONS = ("selfcal", "prunenet")
RECOVERIES = ("none", "self-distillation", "real text", "self-distillation, full KL")
LABELS = {"selfcal": "`selfcal`", "prunenet": "paper's policy (`prunenet`)"}


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def grid(ratios: list[float]) -> list[tuple[str, float, str]]:
    """``(selection, ratio, recovery)`` of every measured row."""
    rows = []
    for selection in SELECTIONS:
        for ratio in ratios:
            rows += [(selection, ratio, "none"), (selection, ratio, "self-distillation")]
            if selection == "selfcal":
                rows.append((selection, ratio, "real text"))
                if ratio == 0.2:
                    rows.append((selection, ratio, "self-distillation, full KL"))
    return rows


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    dense, tokenizer, _ = load_model("smollm2-135m")
    dense.eval()
    eval_text, train_text = load_text(None, "eval"), load_text(None, "train")

    def held_out(model) -> float:
        return perplexity(model, tokenizer, eval_text, max_tokens=args.eval_tokens, context=512, progress=False)[
            "perplexity"
        ]

    cfg = CompressConfig(ratio=0.2, recover_steps=args.steps, recover_tokens=args.teacher_tokens).recovery_config()
    dense_ppl = held_out(dense)
    targets = teacher_targets(dense, sequences=cfg.teacher_tokens // cfg.seq_len, length=cfg.seq_len,
                              top_k=cfg.top_k, seed=cfg.seed, batch_size=cfg.batch_size)  # fmt: skip
    # --kd-top-k 0: the same generated text, no stored distribution (the teacher runs on every batch).
    empty = torch.empty(*targets.ids.shape, 0)
    full = TeacherTargets(targets.ids, empty, empty.int(), empty.sum(-1), targets.seed, {})
    print(f"dense {dense_ppl:.2f}; teacher text {targets.seconds}", flush=True)
    tags, rows, pruned_as = run_tags(), [], None
    for selection, ratio, recovery in grid(args.ratios):
        if (selection, ratio) != pruned_as:  # the grid is ordered: one pruned model at a time
            model, tick = copy.deepcopy(dense), time.perf_counter()
            prune_(model, ratio, method=selection, seed=0)
            select_s, pruned_as = time.perf_counter() - tick, (selection, ratio)
        tick, info = time.perf_counter(), {}
        if recovery == "none":
            ppl = held_out(model)
        else:
            student = copy.deepcopy(model)
            if recovery == "real text":
                peft_model, info = train_lora(student, tokenizer, train_text, cfg, progress=False)
            else:
                kd = full if recovery.endswith("full KL") else targets
                peft_model, info = distill_lora(student, kd, cfg, teacher=dense, adapter=get_adapter(student.config),
                                                progress=False)  # fmt: skip
            student = merge_lora(peft_model)
            ppl = held_out(student)
            del student, peft_model
        row = {
            **tags,
            "selection": selection,
            "ratio": ratio,
            "seed": 0,
            "recovery": recovery,
            "steps": info.get("steps_run", 0),
            "best_step": info.get("best_step", ""),
            "teacher_tokens": cfg.teacher_tokens if "self-distillation" in recovery else "",
            "top_k": (0 if recovery.endswith("full KL") else cfg.top_k) if "self-distillation" in recovery else "",
            "select_s": round(select_s, 1),
            "recovery_s": round(info.get("seconds", 0.0), 1),
            "eval_tokens": args.eval_tokens,
            "dense_ppl": round(dense_ppl, 3),
            "perplexity": round(ppl, 3),
            "over_dense": round(ppl / dense_ppl, 3),
            "peak_rss_gib": round(peak_rss_gib(), 2),
        }
        rows.append(row)
        print(f"{selection:9s} r={ratio} {recovery:28s} ppl {ppl:8.2f} ({row['recovery_s']} s)", flush=True)
        write_csv(Path(args.out) / "recovery.csv", rows)  # after every row: a killed run keeps what it measured
    rows[0]["command"] = " ".join(["python", "benchmarks/recovery.py", *sys.argv[1:]])
    write_csv(Path(args.out) / "recovery.csv", rows)
    return rows


def table(rows: list[dict]) -> str:
    """The Markdown table: one line per selection and recovery, one column per ratio (perplexity, x dense)."""
    ratios = sorted({float(r["ratio"]) for r in rows})
    lines = []
    for selection in SELECTIONS:
        for recovery in RECOVERIES:
            cells = {float(r["ratio"]): r for r in rows if r["selection"] == selection and r["recovery"] == recovery}
            if not cells:
                continue
            name = LABELS[selection] + ("" if recovery == "none" else f" + {recovery}")
            lines.append([name, *(f"{float(cells[q]['perplexity']):.2f} ({float(cells[q]['over_dense']):.2f}x)"
                                  if q in cells else "-" for q in ratios)])  # fmt: skip
    return markdown_table(["selection + recovery", *(f"ratio {q}" for q in ratios)], lines)


def plot(rows: list[dict], path: Path) -> bool:
    """Held-out perplexity vs ratio, one line per selection + recovery; False without matplotlib."""
    plt = pyplot("recovery")
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for selection in SELECTIONS:
        for recovery in RECOVERIES[:3]:
            pts = sorted((float(r["ratio"]), float(r["perplexity"])) for r in rows
                         if r["selection"] == selection and r["recovery"] == recovery)  # fmt: skip
            if pts:
                label = selection + ("" if recovery == "none" else f" + {recovery}")
                ax.plot(*zip(*pts, strict=True), marker="o", linestyle="-" if selection == "selfcal" else "--",
                        label=label)  # fmt: skip
    ax.axhline(float(rows[0]["dense_ppl"]), color="black", linewidth=0.8, label="dense")
    ax.set(xlabel="ratio (fraction of FFN neurons removed)", ylabel="perplexity, held-out eval split", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return True


def markdown(rows: list[dict]) -> str:
    first = rows[0]
    steps = max(int(r["steps"]) for r in rows)
    return "\n".join([
        f"Perplexity on the first {first['eval_tokens']} tokens of the held-out `eval` split (dense: "
        f"{float(first['dense_ppl']):.2f}) after removing a fraction (the ratio) of the FFN neurons of every block "
        f"(seed 0), then recovery: at most {steps} LoRA steps of 4x128 tokens, the settings of `compress --recover`"
        f" (self-distillation: {first['teacher_tokens'] or rows[1]['teacher_tokens']} teacher tokens). "
        f"Made by `{first.get('command') or 'python benchmarks/recovery.py'}` "
        "(`benchmarks/results/recovery.csv`); `compress --recover`'s longer default budget is measured in "
        "[Results](docs/results.md#self-distillation).",
        "",
        table(rows),
    ])  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--steps", type=int, default=60, help="recovery steps at most, the same for every row")
    parser.add_argument("--teacher-tokens", type=int, default=8192, help="tokens the dense model generates")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="tokens of the held-out eval split")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--from-csv", action="store_true", help="only rewrite the table, plot and docs block")
    parser.add_argument("--no-doc", action="store_true", help="leave the README's block alone (e.g. a smoke run)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.from_csv:
        with open(out / "recovery.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = run(args)
    plot(rows, out / "recovery.png")
    if not args.no_doc:
        update_doc_block("recovery", markdown(rows), ROOT / "README.md")


if __name__ == "__main__":
    main()
