"""Compensation study: does refitting the kept out-projection columns (``--compensate``) lower held-out perplexity?

    python benchmarks/compensation_study.py --model smollm2-135m
    python benchmarks/compensation_study.py --model ~/.cache/prunenet/gemma-3-270m --name gemma-3-270m
    python benchmarks/compensation_study.py --report          # only the table and the plot, from the CSV

For each probe source (the model's own generated probes, ``--calibration`` windows of text of the evaluated
genre, windows of text of another genre), probe budget and seed, the model runs forward once on the probes and
every FFN's ``H = sum_t h_t h_t^T`` is accumulated (``h`` the out-projection's input). The neurons are the
shipped ``selfcal`` choice (structured Wanda: ``sqrt(H_jj / T) * ||W[:, j]||``, checked once against
:func:`prunenet.selfcal.selfcal_keeps`); for every ratio they are applied without compensation and with the
library's update (:func:`prunenet.compensation.compensated_columns`) at each dampening, and perplexity is
measured on two held-out texts:

* ``sotu``: the embedded corpus's ``eval`` split (State of the Union addresses from 1990 on), first
  ``--max-tokens`` tokens. The ``sotu`` calibration text is the ``train`` split (before 1990): same genre,
  other documents.
* ``pydoc``: Python's own documentation (the standard library's ``pydoc_data.topics``), another genre. Topics
  are split by name: the first half is calibration text, the second half is evaluated.

Pruning is applied as a mask (dropped columns of the out-projection zeroed, kept ones replaced by the refitted
ones): exactly what slicing gives (``benchmarks/selection_study.py`` checks that on the same models). Random
selection over the same seeds is the floor. Every finished cell is appended to
``benchmarks/results/compensation_study.csv`` at once and skipped when the run is started again.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from prunenet.activations import run_with_hooks
from prunenet.adapters import get_adapter
from prunenet.calibration import calibration_windows, read_calibration
from prunenet.compensation import compensated_columns
from prunenet.models import load_model
from prunenet.perplexity import perplexity
from prunenet.probes import self_probes
from prunenet.selectors import random_keeps
from prunenet.selfcal import selfcal_keeps, top_k
from prunenet.tables import markdown_table
from prunenet.text import SPLITS, load_text, speech_files
from prunenet.widths import kept_width

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, RESULTS, append_csv, finished_keys, pyplot, run_tags, update_doc_block  # noqa: E402

CSV = RESULTS / "compensation_study.csv"
KEY = ("model", "probes", "budget", "seed", "ratio", "update", "damping")
TEXTS = ("sotu", "pydoc")
SHIPPED_DAMPING = "1"  # PruneConfig.damping, as the CSV writes it


def pydoc_topics() -> tuple[list[str], list[str]]:
    """Python's documentation topics (``pydoc_data.topics``), split by sorted name: (calibration, evaluated)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    half = len(names) // 2
    return [topics[n] for n in names[:half]], [topics[n] for n in names[half:]]


def eval_texts() -> dict[str, str]:
    return {"sotu": load_text(None, "eval"), "pydoc": "\n\n".join(pydoc_topics()[1])}


def calibration_paths(name: str, folder: Path) -> list[Path]:
    """The files of calibration text ``name``: the ``train`` split's speeches, or the first half of the topics."""
    if name == "sotu":
        return speech_files(SPLITS["train"])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, topic in enumerate(pydoc_topics()[0]):
        paths.append(folder / f"{i:04d}.txt")
        paths[-1].write_text(topic)
    return paths


def probe_ids(model, tokenizer, probes: str, budget: tuple[int, int], seed: int, scratch: Path) -> torch.Tensor:
    """``(B, T)`` token ids: the model's own probes (``self``) or ``--calibration`` windows of a text."""
    sequences, length = budget
    if probes == "self":
        return self_probes(model, sequences=sequences, length=length, seed=seed)
    text = read_calibration(calibration_paths(probes, scratch / probes))
    return calibration_windows(text, tokenizer, sequences, length, seed).ids


@torch.no_grad()
def grams(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, ``H`` ``(n, n)`` float64 of the out-projection's input over every probe token."""
    adapter = get_adapter(model.config)
    found: dict[int, torch.Tensor] = {}

    def hook_for(layer):
        def hook(module, args):
            h = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            found[layer] = found.get(layer, 0) + h.t() @ h

        return hook

    run_with_hooks(model, adapter, ids, {i: hook_for(i) for i in range(adapter.num_layers(model.config))})
    return [found[i] for i in range(len(found))]


class Masker:
    """Applies kept neurons (and refitted columns) to the dense model's out-projections, and restores them."""

    def __init__(self, model):
        self.model, self.adapter = model, get_adapter(model.config)
        self.params = [
            model.get_parameter(self.adapter.block_prefix(i) + self.adapter.out_projection.name)
            for i in range(self.adapter.num_layers(model.config))
        ]
        assert self.adapter.out_projection.axis == 1, "the study reads (d, n) out-projections"
        self.dense = [p.detach().clone() for p in self.params]

    def apply(self, keeps: list[torch.Tensor], columns: list[torch.Tensor] | None = None) -> None:
        with torch.no_grad():
            for i, (param, keep) in enumerate(zip(self.params, keeps, strict=True)):
                param.zero_()
                param[:, keep] = self.dense[i][:, keep] if columns is None else columns[i]

    def restore(self) -> None:
        with torch.no_grad():
            for param, dense in zip(self.params, self.dense, strict=True):
                param.copy_(dense)


def run(args) -> None:
    torch.manual_seed(0)
    model, tokenizer, _ = load_model(args.model)
    adapter = get_adapter(model.config)
    width = adapter.ffn_width(model.config)
    texts = eval_texts()
    masker = Masker(model)
    done = finished_keys(CSV, KEY)
    tags = run_tags()
    checked = False

    def evaluate(key: dict) -> None:
        row_key = tuple(str(key[k]) for k in KEY)
        if row_key in done:
            return
        tick = time.perf_counter()
        row = dict(key)
        for name in TEXTS:
            ppl = perplexity(model, tokenizer, texts[name], max_tokens=args.max_tokens, context=512, progress=False)
            row[f"ppl_{name}"] = round(ppl["perplexity"], 3)
        row["eval_s"] = round(time.perf_counter() - tick, 1)
        append_csv(CSV, [{**row, **tags}])
        done.add(row_key)
        print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    base = {"model": args.name, "probes": "-", "budget": "-", "seed": 0, "ratio": 0.0, "update": "dense",
            "damping": "-", "probe_s": 0, "gram_s": 0, "solve_s": 0}  # fmt: skip
    masker.restore()
    evaluate(base)
    for ratio in args.ratios:
        k = kept_width(ratio, width)
        for seed in args.seeds:
            masker.apply(random_keeps(adapter.num_layers(model.config), width, k, seed=seed))
            evaluate({**base, "ratio": ratio, "seed": seed, "update": "random"})
            masker.restore()
    with tempfile.TemporaryDirectory(prefix="compensation-study-") as scratch:
        for probes, budget in args.cells:
            for seed in args.seeds:
                updates = [("none", "-")] + [("obs", x) for x in args.damping]
                cells = [(r, u, d) for r in args.ratios for u, d in updates]
                label = f"{budget[0]}x{budget[1]}"
                keys = [{**base, "probes": probes, "budget": label, "seed": seed, "ratio": r, "update": u, "damping": d}
                        for r, u, d in cells]  # fmt: skip
                if all(tuple(str(key[c]) for c in KEY) in done for key in keys):
                    continue
                masker.restore()
                tick = time.perf_counter()
                ids = probe_ids(model, tokenizer, probes, budget, seed, Path(scratch))
                probe_s = time.perf_counter() - tick
                tick = time.perf_counter()
                hs = grams(model, ids)
                gram_s = time.perf_counter() - tick
                tokens = ids.numel()
                norms = [p.detach().double().norm(dim=0) for p in masker.dense]  # (n,) per layer
                for key in keys:
                    k = kept_width(key["ratio"], width)
                    keeps = [top_k((h.diagonal() / tokens).sqrt() * norm, k) for h, norm in zip(hs, norms, strict=True)]
                    if not checked:  # the study's choice is the shipped selector's
                        shipped = selfcal_keeps(model, k, ids=ids)
                        assert all(torch.equal(a, b) for a, b in zip(keeps, shipped, strict=True))
                        checked = True
                    tick = time.perf_counter()
                    columns = None
                    if key["update"] == "obs":
                        columns = [compensated_columns(h, w, keep, float(key["damping"]))
                                   for h, w, keep in zip(hs, masker.dense, keeps, strict=True)]  # fmt: skip
                    solve_s = time.perf_counter() - tick
                    masker.apply(keeps, columns)
                    key.update(probe_s=round(probe_s, 1), gram_s=round(gram_s, 1), solve_s=round(solve_s, 2))
                    evaluate(key)
                    masker.restore()
                del hs


def parse_cells(values: list[str]) -> list[tuple[str, tuple[int, int]]]:
    """``self:8x128`` -> ``("self", (8, 128))``."""
    cells = []
    for value in values:
        probes, _, budget = value.partition(":")
        sequences, _, length = budget.partition("x")
        cells.append((probes, (int(sequences), int(length))))
    return cells


# ---------------------------------------------------------------------------------------------------------------
# Report


def read_rows() -> list[dict]:
    with open(CSV, newline="") as f:
        return list(csv.DictReader(f))


PROBES = {"self": "self-generated", "sotu": "`sotu` text (same genre)", "pydoc": "`pydoc` text (other genre)"}


def docs_table(med: dict, groups: dict) -> str:
    """docs/methods.md's block: per model, ratio and probe source, the selection alone against the shipped
    dampening and against 0.1, on both held-out texts; random selection as the floor."""

    def change(values, base, text):
        return f"{values[text]:.2f} ({100 * (values[text] / base[text] - 1):+.1f} %)"

    rows = []
    for (model, probes, budget, ratio, update, _), base in sorted(med.items()):
        if update != "none":
            continue
        key = (model, probes, budget, ratio)
        shipped, low = med.get((*key, "obs", SHIPPED_DAMPING)), med.get((*key, "obs", "0.1"))
        rand = med.get((model, "-", "-", ratio, "random", "-"))
        seeds = len(groups[(*key, "none", "-")])
        rows.append([model, ratio, f"{PROBES.get(probes, probes)}, {budget}", seeds,
                     *[f"{base[t]:.2f}" for t in TEXTS],
                     *[change(shipped, base, t) if shipped else "-" for t in TEXTS],
                     change(low, base, "sotu") if low else "-",
                     *[f"{rand[t]:.1f}" if rand else "-" for t in TEXTS]])  # fmt: skip
    header = ["model", "ratio", "probe tokens", "seeds", "`sotu`: selection alone", "`pydoc`: selection alone",
              f"`sotu`: compensated (λ = {SHIPPED_DAMPING}, default)", f"`pydoc`: compensated (λ = {SHIPPED_DAMPING})",
              "`sotu`: λ = 0.1", "random `sotu`", "random `pydoc`"]  # fmt: skip
    return (
        "Median held-out perplexity over the seeds (`python benchmarks/compensation_study.py`, "
        "`benchmarks/results/compensation_study.csv`; every dampening in `compensation_study.md`).\n\n"
        + markdown_table(header, rows)
    )


def report() -> None:
    """The table of medians over seeds (docs/methods.md takes it as it is) and the plot."""
    rows = read_rows()
    groups = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["probes"], row["budget"], row["ratio"], row["update"], row["damping"])].append(row)
    med = {key: {t: statistics.median(float(r[f"ppl_{t}"]) for r in rs) for t in TEXTS} for key, rs in groups.items()}
    table = []
    for (model, probes, budget, ratio, update, damping), values in sorted(med.items()):
        if update in ("none", "dense", "random"):
            continue
        base = med[(model, probes, budget, ratio, "none", "-")]
        rand = med.get((model, "-", "-", ratio, "random", "-"), {})
        n = len(groups[(model, probes, budget, ratio, update, damping)])
        table.append([model, ratio, probes, budget, damping, n,
                      *[f"{base[t]:.2f} → {values[t]:.2f} ({100 * (values[t] / base[t] - 1):+.1f} %)" for t in TEXTS],
                      *[f"{rand[t]:.1f}" if t in rand else "-" for t in TEXTS]])  # fmt: skip
    header = ["model", "ratio", "probes", "budget", "damping", "seeds",
              "sotu: none → compensated", "pydoc: none → compensated", "random sotu", "random pydoc"]  # fmt: skip
    out = RESULTS / "compensation_study.md"
    out.write_text(
        "Median held-out perplexity over seeds (`benchmarks/compensation_study.py`; the change against the same "
        "neurons without compensation).\n\n" + markdown_table(header, table) + "\n"
    )
    print(out.read_text())
    update_doc_block("compensation", docs_table(med, groups), DOCS / "methods.md")
    plt = pyplot("compensation_study.py")
    if plt is None:
        return
    models = sorted({key[0] for key in med})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    colors = {cell: f"C{i}" for i, cell in enumerate(sorted({(k[1], k[2]) for k in med if k[4] == "none"}))}
    for ax, model in zip(axes[0], models, strict=True):
        for probes, budget in sorted({(k[1], k[2]) for k in med if k[0] == model and k[4] == "none"}):
            color = colors[(probes, budget)]
            ratios = sorted({k[3] for k in med if k[:3] == (model, probes, budget)}, key=float)
            for update, damping, style in (("none", "-", "--"), ("obs", SHIPPED_DAMPING, "-")):
                points = [(float(r), med[(model, probes, budget, r, update, damping)]["sotu"]) for r in ratios
                          if (model, probes, budget, r, update, damping) in med]  # fmt: skip
                label = f"{probes} {budget}, " + ("no update" if update == "none" else f"compensated, λ={damping}")
                ax.plot(*zip(*points, strict=True), style, color=color, marker="o", label=label)
        floor = sorted((float(k[3]), v["sotu"]) for k, v in med.items() if k[0] == model and k[4] == "random")
        if floor:
            ax.plot(*zip(*floor, strict=True), ":", color="gray", label="random selection")
        ax.set_yscale("log")
        ax.set_title(f"{model}: held-out sotu perplexity (median of seeds)")
        ax.set_xlabel("ratio")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "compensation_study.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a model folder or the embedded model's name")
    parser.add_argument("--name", default=None, help="the model's name in the CSV (default: --model)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--damping", nargs="+", default=["0.01", "0.1", "1"], help="dampenings of the update")
    parser.add_argument("--cells", nargs="+", default=["self:8x128", "self:32x128", "sotu:8x128", "sotu:32x128",
                        "pydoc:32x128"], help="PROBES:SEQUENCESxLENGTH, PROBES one of self, sotu, pydoc")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=2048, help="evaluated tokens of each held-out text")
    parser.add_argument("--report", action="store_true", help="only write the table and the plot from the CSV")
    args = parser.parse_args()
    if args.report:
        report()
        return
    args.name = args.name or args.model
    args.cells = parse_cells(args.cells)
    run(args)
    report()


if __name__ == "__main__":
    main()
