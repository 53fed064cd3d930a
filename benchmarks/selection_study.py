"""Selection study: which calibration-free way of choosing FFN neurons keeps perplexity lowest?

    python benchmarks/selection_study.py --stage screen --seeds 3 --max-tokens 512              # every candidate
    python benchmarks/selection_study.py --stage confirm --seeds 5 --max-tokens 2048 \\
        --methods random prunenet selfcal-wanda-gen                                              # the winners
    python benchmarks/selection_study.py --from-csv                                             # only the tables

For each method, ratio and seed, the neurons are chosen, applied to the dense model, and perplexity is measured
on two disjoint real held-out texts (the ``pre1900`` and ``post1900`` State of the Union splits of
:mod:`prunenet.text`, the first ``--max-tokens`` tokens of each). Rows are appended to
``benchmarks/results/selection_study.csv``; ``selection_study.md`` gets, per stage, the median (min-max) over
seeds, the ratio of each median to the random median, the time to choose, and the Spearman correlation
(scipy) of every method's internal objective with perplexity over *all* selections evaluated at that ratio
(every method and seed, random draws included): an objective that predicts perplexity should rank them.

Speed: the model is loaded once. Pruning is applied as a *mask*: the out-projection columns of dropped neurons
are zeroed (a dropped neuron then adds exactly nothing to the block's output, as if sliced) and restored from
a saved copy before the next candidate -- no copies of the model, no re-slicing. The run checks once that the
masked perplexity equals the sliced one (the library's :func:`prunenet.slicing.slice_model_`).
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from scipy.stats import spearmanr

from prunenet import activations as A
from prunenet import probes as P
from prunenet import selfcal as S
from prunenet.adapters import get_adapter
from prunenet.config import kept_width
from prunenet.models import load_model
from prunenet.perplexity import document_prefix, perplexity, tokenize_prefix
from prunenet.selectors import magnitude_keeps, policy_keeps, random_keeps
from prunenet.slicing import slice_model_
from prunenet.tables import markdown_table
from prunenet.text import load_text
from prunenet.train import TrainConfig, train_policy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import selection_variants as V  # noqa: E402
from common import RESULTS, append_csv, cell, run_tags  # noqa: E402

TEXTS = ("pre1900", "post1900")
# method -> (description, internal objective used for the correlation column, or "" when it has none)
CANDIDATES = {
    "random": ("k rows uniformly at random (the baseline)", ""),
    "magnitude": ("k rows of largest gate-row L2 norm (deterministic)", "energy"),
    "prunenet": ("the paper: policy on gate rows, 1/KS reward on gate spectra, sampling", "ks"),
    "pn-ks3": ("policy, reward 1/KS averaged over gate, up and down spectra", "ks3"),
    "pn-w1": ("policy, reward 1/W1 between spectra (gate, up, down)", "w1"),
    "pn-energy": ("policy, reward = retained energy sum(sigma^2) of gate, up, down", "energy"),
    "pn-baseline": ("the paper's reward with a per-layer baseline and normalised advantage", "ks"),
    "pn-concat": ("policy on concatenated gate/up/down rows, 1/KS reward, baseline", "ks"),
    "random+sw": ("random, but outlier (super weight) neurons always kept", ""),
    "prunenet+sw": ("the paper's selection with outlier neurons always kept", "ks"),
    "selfcal-wanda-gen": ("forward pass on 8x128 self-generated tokens; RMS(h_j) * ‖W_down[:, j]‖", "wanda"),
    "selfcal-flap-gen": ("forward pass on 8x128 self-generated tokens; Var(h_j) * ‖W_down[:, j]‖^2", "flap"),
    "selfcal-wanda-rand": ("forward pass on 8x128 uniformly random tokens; Wanda score", "wanda"),
    "selfcal-wanda-gen+sw": ("selfcal-wanda-gen with outlier neurons always kept", "wanda"),
    "selfcal-wanda-gen-small": ("selfcal-wanda-gen with only 2x64 self-generated tokens", "wanda"),
    "selfcal-wanda-gen-t07": ("selfcal-wanda-gen with the probes sampled at temperature 0.7", "wanda"),
    "selfcal-wanda-gen-starts": ("selfcal-wanda-gen, each probe started from BOS + a random vocabulary token", "wanda"),
    "selfcal-wanda-gen-32x128": ("selfcal-wanda-gen with 32x128 self-generated tokens", "wanda"),
    "selfcal-wanda-seq": ("sequential: layer i scored on the model whose layers < i are already pruned", "wanda"),
    "calib-pre1900": ("Wanda on 8x128 *real* tokens of `pre1900` (after the evaluated ones; seed = offset)", "wanda"),
    "calib-post1900": ("Wanda on 8x128 *real* tokens of `post1900` (after the evaluated ones; seed = offset)", "wanda"),
}
CALIBRATION_START = 4096  # first token of the calibration windows: past every evaluated token (--max-tokens)
OBJECTIVES = ("ks", "ks3", "w1", "energy", "wanda", "flap")


class Study:
    """The dense model loaded once, its out-projections masked per candidate, and cached method inputs."""

    def __init__(self, model_spec: str, max_tokens: int, context: int = 512):
        self.model, self.tokenizer, _ = load_model(model_spec)
        self.model.eval()
        self.adapter = get_adapter(self.model.config)
        cfg = self.model.config
        self.layers, self.width = self.adapter.num_layers(cfg), self.adapter.ffn_width(cfg)
        self.states = [self.adapter.layer_state(self.model, i) for i in range(self.layers)]
        self.texts = {name: load_text(split=name) for name in TEXTS}
        self.max_tokens, self.context = max_tokens, context
        spec = self.adapter.out_projection
        self.out_axis = spec.axis  # neurons' axis of the out-projection weight
        self.out_params = [
            self.model.get_parameter(self.adapter.block_prefix(i) + spec.name) for i in range(self.layers)
        ]
        self.original = [p.detach().clone() for p in self.out_params]
        self._layer_data = None
        self._probes: dict[tuple, torch.Tensor] = {}
        self._stats: dict[tuple, A.ActivationStats] = {}
        self._reference_scores: dict[str, torch.Tensor] = {}
        self._policies: dict[tuple[int, int], torch.nn.Module] = {}

    # -- applying a selection ----------------------------------------------------------------------------------
    @torch.no_grad()
    def mask(self, keeps: list[torch.Tensor] | None) -> None:
        """Zero the out-projection entries of dropped neurons (``None``: restore the dense model)."""
        for i, (param, orig) in enumerate(zip(self.out_params, self.original, strict=True)):
            param.copy_(orig)
            if keeps is not None:
                drop = torch.ones(self.width, dtype=torch.bool)
                drop[keeps[i]] = False
                param.index_fill_(self.out_axis, torch.nonzero(drop).squeeze(1), 0.0)

    def perplexities(self, model=None) -> dict[str, float]:
        model = model or self.model
        return {
            name: perplexity(
                model,
                self.tokenizer,
                text,
                max_tokens=self.max_tokens,
                context=self.context,
                batch_size=4,
                progress=False,
            )["perplexity"]  # fmt: skip
            for name, text in self.texts.items()
        }

    def check_mask_equals_slice(self, k: int) -> tuple[dict, dict]:
        """Perplexities of one random selection applied by masking and by the library's slicing."""
        keeps = random_keeps(self.layers, self.width, k, seed=123)
        self.mask(keeps)
        masked = self.perplexities()
        self.mask(None)
        sliced_model = copy.deepcopy(self.model)
        slice_model_(sliced_model, get_adapter(sliced_model.config), keeps, progress=False)
        sliced = self.perplexities(sliced_model)
        del sliced_model
        return masked, sliced

    # -- method inputs, cached -----------------------------------------------------------------------------------
    def layer_data(self) -> list[V.LayerData]:
        if self._layer_data is None:
            self._layer_data = [V.LayerData.of(self.adapter.neuron_matrices(self.model, i)) for i in range(self.layers)]
        return self._layer_data

    def probes(self, probe: str, seed: int, sequences: int = 8, length: int = 128, temperature: float = 1.0,
               starts: bool = False) -> torch.Tensor:  # fmt: skip
        """Probe ids ``(sequences, length)`` of the dense model, cached: ``probe`` as :func:`P.self_probes`;
        ``starts``: each sequence begins with BOS and one uniformly random vocabulary token."""
        key = (probe, seed, sequences, length, temperature, starts)
        if key not in self._probes:
            self.mask(None)
            if starts:
                generator = torch.Generator().manual_seed(seed)
                vocab = self.model.get_output_embeddings().weight.shape[0]
                bos = torch.full((sequences, 1), P.start_token(self.model), dtype=torch.long)
                prefix = torch.cat([bos, torch.randint(vocab, (sequences, 1), generator=generator)], 1)
                length = get_adapter(self.model.config).capped_length(self.model.config, length)
                self._probes[key] = P.sample(self.model, prefix, length, generator, temperature=temperature)
            else:
                self._probes[key] = P.self_probes(self.model, kind=probe, sequences=sequences, length=length,
                                                  seed=seed, temperature=temperature)  # fmt: skip
        return self._probes[key]

    def stats(self, probe: str, seed: int, sequences: int = 8, length: int = 128, temperature: float = 1.0,
              starts: bool = False) -> A.ActivationStats:  # fmt: skip
        key = (probe, seed, sequences, length, temperature, starts)
        if key not in self._stats:
            ids = self.probes(probe, seed, sequences, length, temperature, starts)
            self.mask(None)
            self._stats[key] = A.activation_stats(self.model, ids)
        return self._stats[key]

    def calibration_ids(self, split: str, seed: int, sequences: int = 8, length: int = 128) -> torch.Tensor:
        """``(sequences, length)``: real tokens of ``split`` from token ``CALIBRATION_START + seed * sequences *
        body`` on (never among the evaluated first ``--max-tokens`` tokens), each sequence after the tokenizer's
        document prefix (``body`` = ``length`` minus its length), as the evaluation's windows."""
        prefix = torch.tensor(document_prefix(self.tokenizer), dtype=torch.long)  # e.g. Gemma's BOS
        body = length - prefix.numel()
        begin = CALIBRATION_START + seed * sequences * body
        ids = tokenize_prefix(self.tokenizer, self.texts[split], begin + sequences * body)[begin:]
        assert ids.numel() == sequences * body, f"{split} is too short for calibration seed {seed}"
        return torch.cat([prefix.expand(sequences, -1), ids.view(sequences, body)], 1)

    def real_stats(self, split: str, seed: int) -> A.ActivationStats:
        """Statistics on real text (:meth:`calibration_ids`): what calibrated structured Wanda sees."""
        key = ("real:" + split, seed)
        if key not in self._stats:
            self.mask(None)
            self._stats[key] = A.activation_stats(self.model, self.calibration_ids(split, seed))
        return self._stats[key]

    def sequential_keeps(self, ids: torch.Tensor, k: int) -> list[torch.Tensor]:
        """Wanda scores of layer ``i`` on the model whose layers ``< i`` are already pruned (masked): each
        layer is chosen for the inputs it will see after pruning, as SparseGPT-style methods do."""
        keeps: list[torch.Tensor] = []
        everything = torch.arange(self.width)
        for i in range(self.layers):
            self.mask(keeps + [everything] * (self.layers - i))
            stats = A.activation_stats(self.model, ids)  # every layer's; layer i's is the one used
            keeps.append(S.top_k(S.neuron_scores(stats, "wanda")[i], k))
        self.mask(None)
        return keeps

    def super_neurons(self) -> list[torch.Tensor]:
        return [V.super_weight_neurons(list(ld.matrices)) for ld in self.layer_data()]

    def select(self, method: str, k: int, seed: int) -> list[torch.Tensor]:
        """Kept neurons per layer for one candidate (the dense model is restored first)."""
        self.mask(None)
        if method == "random":
            return random_keeps(self.layers, self.width, k, seed)
        if method == "magnitude":
            return magnitude_keeps(self.states, k)
        if method in ("prunenet", "prunenet+sw"):
            if (k, seed) not in self._policies:  # prunenet+sw reuses prunenet's policy (the same training)
                self._policies[k, seed] = train_policy(self.states, k, TrainConfig(seed=seed), progress=False).policy
            policy = self._policies[k, seed]
            if method == "prunenet":
                return policy_keeps(self.states, k, policy, "sample", seed)
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                logits = [policy.logits(w) for w in self.states]
            return [
                self._protected_sample(lg, k, sw, generator)
                for lg, sw in zip(logits, self.super_neurons(), strict=True)
            ]
        if method == "random+sw":
            generator = torch.Generator().manual_seed(seed)
            return [self._protected_sample(torch.zeros(self.width), k, sw, generator) for sw in self.super_neurons()]
        if method.startswith("pn-"):
            options = {
                "pn-ks3": dict(reward="ks3"),
                "pn-w1": dict(reward="w1"),
                "pn-energy": dict(reward="energy"),
                "pn-baseline": dict(reward="ks", baseline=True),
                "pn-concat": dict(reward="ks", inputs="concat", baseline=True),
            }[method]
            logits = V.train_variant(self.layer_data(), k, seed=seed, **options)
            generator = torch.Generator().manual_seed(seed)
            from prunenet.policy import select_rows

            return [select_rows(lg, k, "sample", generator) for lg in logits]
        if method.startswith("calib-"):
            scores = S.neuron_scores(self.real_stats(method.removeprefix("calib-"), seed), "wanda")
            return [S.top_k(scores[i], k) for i in range(self.layers)]
        if method == "selfcal-wanda-seq":
            return self.sequential_keeps(self.probes("generate", seed), k)
        if method.startswith("selfcal-"):
            score = "flap" if "-flap-" in method else "wanda"
            probe = "random" if method.endswith("-rand") else "generate"
            size = {"-small": (2, 64), "-32x128": (32, 128)}.get(method[method.rfind("-") :], (8, 128))
            temperature = 0.7 if method.endswith("-t07") else 1.0
            stats = self.stats(probe, seed, *size, temperature=temperature, starts=method.endswith("-starts"))
            scores = S.neuron_scores(stats, score)
            protect = self.super_neurons() if method.endswith("+sw") else [None] * self.layers
            return [S.top_k(scores[i], k, protect[i]) for i in range(self.layers)]
        raise ValueError(f"unknown candidate {method!r}")

    def _protected_sample(self, logits, k, protect, generator) -> torch.Tensor:
        """Sample like the paper's rule but with ``protect`` always kept (their logits set to +inf)."""
        from prunenet.policy import select_rows

        logits = logits.clone().float()
        rows = select_rows(logits, k, "sample", generator)
        if protect.numel() == 0:
            return rows
        missing = protect[~torch.isin(protect, rows)]
        if missing.numel() == 0:
            return rows
        # Swap the missing outliers in for the last-drawn non-protected rows: draw order is lost by sorting,
        # so drop uniformly among the kept non-protected rows (seeded).
        others = rows[~torch.isin(rows, protect)]
        drop = others[torch.randperm(others.numel(), generator=generator)[: missing.numel()]]
        return torch.cat([rows[~torch.isin(rows, drop)], missing]).sort().values

    # -- objectives for the correlation ---------------------------------------------------------------------------
    def objectives(self, keeps: list[torch.Tensor], names=OBJECTIVES) -> dict[str, float]:
        """The internal objectives ``names`` (higher = better for the method) of one selection, summed over layers."""
        out = dict.fromkeys(OBJECTIVES, float("nan"))
        data = self.layer_data()
        for name in ("ks", "ks3", "w1", "energy"):
            if name in names:
                out[name] = sum(ld.objective(name, keep) for ld, keep in zip(data, keeps, strict=True))
        for score in ("wanda", "flap"):
            if score not in names:
                continue
            if score not in self._reference_scores:  # a fixed reference probe (seed 1000) for every selection
                self._reference_scores[score] = S.neuron_scores(self.stats("generate", 1000), score)
            ref = self._reference_scores[score]
            out[score] = sum(float(ref[i, keep].sum() / ref[i].sum()) for i, keep in enumerate(keeps))
        return out


def run(args) -> None:
    torch.set_num_threads(args.threads)
    study = Study(args.model, args.max_tokens)
    label = args.label or Path(args.model).name
    tags = run_tags()
    out = Path(args.out)
    if args.check_mask:
        masked, sliced = study.check_mask_equals_slice(kept_width(0.2, study.width))
        print(f"mask vs slice perplexity (random selection, ratio 0.2): masked {masked}, sliced {sliced}")
        append_csv(out / "selection_study.csv", [
            {"stage": "mask-check", "model": label, "method": f"random-{how}", "ratio": 0.2, "seed": 123, "text": t,
             "perplexity": p, "tokens": args.max_tokens, "select_s": 0.0, **dict.fromkeys(OBJECTIVES, ""), **tags}
            for how, ppl in (("masked", masked), ("sliced", sliced)) for t, p in ppl.items()])  # fmt: skip
    dense = study.perplexities()
    rows = [{"stage": args.stage, "model": label, "method": "dense", "ratio": 0.0, "seed": "", "text": t,
             "perplexity": p, "tokens": args.max_tokens, "select_s": 0.0, **dict.fromkeys(OBJECTIVES, ""), **tags}
            for t, p in dense.items()]  # fmt: skip
    append_csv(out / "selection_study.csv", rows)
    for ratio in args.ratios:
        k = kept_width(ratio, study.width)
        for method in args.methods:
            seeds = [0] if method == "magnitude" else range(args.seeds)
            for seed in seeds:
                tick = time.perf_counter()
                keeps = study.select(method, k, seed)
                select_s = time.perf_counter() - tick
                assert all(keep.shape == (k,) for keep in keeps), method
                objectives = study.objectives(keeps, args.objectives)
                study.mask(keeps)
                ppl = study.perplexities()
                study.mask(None)
                rows = [{"stage": args.stage, "model": label, "method": method, "ratio": ratio, "seed": seed, "text": t,
                         "perplexity": p, "tokens": args.max_tokens, "select_s": round(select_s, 2),
                         **{o: f"{v:.6g}" if v == v else "" for o, v in objectives.items()}, **tags}
                        for t, p in ppl.items()]  # fmt: skip
                append_csv(out / "selection_study.csv", rows)
                print(f"{method:24s} r={ratio} seed={seed} " + " ".join(f"{t}={p:.1f}" for t, p in ppl.items())
                      + f" select {select_s:.1f}s", flush=True)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Tables


def report(rows: list[dict]) -> str:
    """The Markdown report of every stage in ``rows`` (CSV rows as dicts)."""
    parts = [
        "# Selection study",
        "",
        "Perplexity of real models (SmolLM2-135M, the embedded model; Gemma-3-270M, see `benchmarks/gemma3_270m.py`) "
        "with a fraction (the ratio) of the FFN neurons of every block removed, no fine-tuning, on two disjoint "
        "held-out texts (State of the Union `pre1900` / `post1900`, "
        "the first N tokens of each in 512-token windows). A cell is the median (min-max) over seeds; "
        "`vs random` is the method's median over the random median of the same stage, ratio and text "
        "(0.80 or less: at least 20 % better than random). `select s` is the median time to choose the neurons "
        "(2 CPU cores shared with other jobs: load average 6-12 during these runs, so times are pessimistic; a "
        "`selfcal` variant reusing probes already generated for that seed -- `flap`, `+sw`, the second ratio -- "
        "shows only its scoring time). `rho` is Spearman's correlation of the method's internal objective (higher = "
        "better for the method) with perplexity over all selections evaluated at that ratio and text in the "
        "stage (every method and seed): a useful objective has a strongly *negative* rho. No method uses any "
        "dataset but `calib-*`, the references: structured Wanda calibrated on real text of one of the two "
        "domains; `selfcal-*` run the model forward on text the model generates itself (or random ids).",
        "",
        "| method | what it does | objective |",
        "|---|---|---|",
        *(f"| `{m}` | {d} | {o or '-'} |" for m, (d, o) in CANDIDATES.items()),
    ]
    parts += calibration_summary(rows)
    by_stage = defaultdict(list)
    for r in rows:
        by_stage[r["model"], r["stage"]].append(r)
    checks = {key[0]: by_stage.pop(key) for key in [key for key in by_stage if key[1] == "mask-check"]}
    for model, check in checks.items():
        parts += ["", f"Masking (zeroing the out-projection columns of dropped neurons) equals slicing on `{model}`: "
                  "one random selection at ratio 0.2 (seed 123), perplexity masked / sliced: "
                  + ", ".join(f"`{t}` {float(a['perplexity']):.4f} / {float(b['perplexity']):.4f}"
                              for t in TEXTS
                              for a in check if a["text"] == t and a["method"] == "random-masked"
                              for b in check if b["text"] == t and b["method"] == "random-sliced") + "."]  # fmt: skip
    for (model, stage), srows in by_stage.items():
        tokens = sorted({r["tokens"] for r in srows})
        seeds = sorted({r["seed"] for r in srows if r["seed"] != ""})
        parts += ["", f"## `{model}`, stage `{stage}` ({', '.join(tokens)} tokens per text, seeds {', '.join(seeds)})",
                  ""]  # fmt: skip
        dense = {r["text"]: float(r["perplexity"]) for r in srows if r["method"] == "dense"}
        parts.append("Dense: " + ", ".join(f"`{t}` {p:.2f}" for t, p in dense.items()) + ".")
        ratios = sorted({float(r["ratio"]) for r in srows if r["method"] != "dense"})
        methods = [m for m in CANDIDATES if any(r["method"] == m for r in srows)]
        table = []
        for ratio in ratios:
            at = [r for r in srows if r["method"] != "dense" and float(r["ratio"]) == ratio]
            for method in methods:
                mine = [r for r in at if r["method"] == method]
                if not mine:
                    continue
                row = [f"`{method}`", ratio, len({r["seed"] for r in mine})]
                for text in TEXTS:
                    vals = [float(r["perplexity"]) for r in mine if r["text"] == text]
                    rand = [float(r["perplexity"]) for r in at if r["method"] == "random" and r["text"] == text]
                    rel = f"{statistics.median(vals) / statistics.median(rand):.2f}" if vals and rand else "-"
                    objective = CANDIDATES[method][1]
                    rho = "-"
                    if objective:
                        pts = [
                            (float(r[objective]), float(r["perplexity"]))
                            for r in at
                            if r["text"] == text and r[objective] != ""
                        ]
                        if len(pts) >= 4:
                            stat = spearmanr([p[0] for p in pts], [p[1] for p in pts])
                            rho = f"{stat.statistic:+.2f} (p={stat.pvalue:.2g}, n={len(pts)})"
                    row += [cell(vals), rel, rho]
                row.append(f"{statistics.median(float(r['select_s']) for r in mine):.1f}")
                table.append(row)
        headers = ["method", "ratio", "seeds"]
        for text in TEXTS:
            headers += [f"`{text}` ppl", "vs random", f"rho (`{text}`)"]
        headers.append("select s")
        parts += ["", markdown_table(headers, table)]
    return "\n".join(parts) + "\n"


SHIPPED = "selfcal-wanda-gen"  # what `--method selfcal` does with its default settings


def calibration_summary(rows: list[dict]) -> list[str]:
    """The shipped self-calibration against Wanda calibrated on real text of the evaluated domain ("same") and
    of the other one ("other"), per model, ratio and text, with the best self-calibrated variant."""
    table = []
    groups = sorted({(r["model"], r["stage"], float(r["ratio"])) for r in rows if r["method"].startswith("calib-")})
    for model, stage, ratio in groups:
        mine = [r for r in rows if (r["model"], r["stage"]) == (model, stage)]
        at = [r for r in mine if float(r["ratio"]) == ratio]
        for text in TEXTS:
            dense = next(float(r["perplexity"]) for r in mine if r["method"] == "dense" and r["text"] == text)
            other = next(t for t in TEXTS if t != text)

            def median(method: str, at=at, text=text) -> float | None:
                vals = [float(r["perplexity"]) for r in at if r["method"] == method and r["text"] == text]
                return statistics.median(vals) if vals else None

            shipped, same, cross = median(SHIPPED), median(f"calib-{text}"), median(f"calib-{other}")
            variants = {m: median(m) for m in CANDIDATES if m.startswith("selfcal-") and median(m) is not None}
            best = min(variants, key=variants.get)
            table.append([f"`{model}`", ratio, f"`{text}`", f"{dense:.2f}",
                          f"{shipped:.1f}", f"{cross:.1f}", f"{same:.1f}", f"{shipped / same:.2f}",
                          "yes" if shipped < cross else "no", "yes" if shipped <= 1.3 * same else "no",
                          f"`{best}` {variants[best]:.1f} ({variants[best] / same:.2f})"])  # fmt: skip
    if not table:
        return []
    headers = ["model", "ratio", "text", "dense", f"`{SHIPPED}` (shipped)", "calibrated, other domain",
               "calibrated, same domain", "shipped / same", "beats other", "within 30 % of same",
               "best self-calibrated variant (/ same)"]  # fmt: skip
    return ["", "## Self-calibration against calibration on real text", "",
            "Medians over the seeds of each method (a calibration seed is another window of real text). The shipped "
            "default must beat calibration on the other domain's text and come within 30 % of calibration on the "
            "evaluated domain's own text.", "", markdown_table(headers, table)]  # fmt: skip


def write_report(out: Path) -> None:
    with open(out / "selection_study.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    (out / "selection_study.md").write_text(report(rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="the dense model: the embedded one, or a folder")
    parser.add_argument("--label", default=None, help="the model's name in the CSV and report (default: --model's)")
    parser.add_argument("--stage", default="screen", help="label of this run in the CSV and the report")
    parser.add_argument("--methods", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every seeded method")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens of each held-out text")
    parser.add_argument(
        "--objectives",
        nargs="+",
        default=list(OBJECTIVES),
        choices=OBJECTIVES,
        help="objectives to compute for the correlation column (ks3 and w1 cost ~180 eigensolves each)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="1: on 2 shared cores, 2 threads made small matmuls 40x slower (thread contention)",
    )
    parser.add_argument("--check-mask", action="store_true", help="verify once that masking equals slicing")
    parser.add_argument("--from-csv", action="store_true", help="only rewrite selection_study.md from the CSV")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not args.from_csv:
        run(args)
    write_report(Path(args.out))


if __name__ == "__main__":
    main()
