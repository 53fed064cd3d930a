"""Scores once, any ratio: a fresh ``selfcal`` run against a run cut from saved scores (``--scores``), and
``--ratio 0.1,0.2,0.3`` against three separate runs, on the embedded model.

    python benchmarks/bench_scores.py               # 3 interleaved repetitions (about 8 min on 2 CPU cores)
    python benchmarks/bench_scores.py --repeats 1   # one of each

Each run is the command a user types, in its own process (``benchmarks/bench_compress.py``'s ``run_compress``):
wall-clock around the child (interpreter start and imports included), the phase times from its ``--json``
summary, peak RSS from ``os.wait4``. The scores come from one untimed ``--ratio 0.1`` run. The cases, at ratio
0.3 (``ratios``: 0.1, 0.2 and 0.3):

* ``fresh`` / ``scores``: a fresh run, and one with ``--scores`` (compensation on, the default: one forward pass
  over the stored probes to refit the kept columns);
* ``fresh-no-compensate`` / ``scores-no-compensate``: both with ``--no-compensate`` (from scores: no forward pass);
* ``three-runs`` / ``one-run-three-ratios``: three fresh runs, and one ``--ratio 0.1,0.2,0.3`` run.

Every run from scores is checked to keep the neurons of its fresh twin. Medians over ``--repeats``, peak RSS the
maximum; one CSV row per case is appended to ``benchmarks/results/scores_reuse.csv`` with the command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compress import run_compress  # noqa: E402
from common import RESULTS, append_csv, run_tags  # noqa: E402

from prunenet.tables import format_table  # noqa: E402

RATIO = "0.3"
RATIOS = "0.1,0.2,0.3"
PHASES = ("load_s", "select_s", "probe_s", "stats_s", "compensate_s", "save_s")


def kept(out: Path) -> list:
    return json.loads((out / "prunenet.json").read_text())["kept_indices"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every case")
    parser.add_argument("--out", type=Path, default=RESULTS / "scores_reuse.csv", help="CSV to append to")
    args = parser.parse_args(argv)
    if args.model.lower() == "smollm2-135m":
        from prunenet.embedded import ensure_default_model

        ensure_default_model()  # convert once, untimed
    command = shlex.join(["python", "benchmarks/bench_scores.py", *(argv if argv is not None else sys.argv[1:])])
    with tempfile.TemporaryDirectory(prefix="prunenet-scores-") as tmp:
        tmp = Path(tmp)
        base = ["--model", args.model, "--device", "cpu", "--overwrite"]
        run_compress([*base, "--ratio", "0.1", "--out", str(tmp / "first")], {})
        scores = str(tmp / "first" / "scores.safetensors")
        cases = {
            "fresh": [["--ratio", RATIO]],
            "scores": [["--ratio", RATIO, "--scores", scores]],
            "fresh-no-compensate": [["--ratio", RATIO, "--no-compensate"]],
            "scores-no-compensate": [["--ratio", RATIO, "--no-compensate", "--scores", scores]],
            "three-runs": [["--ratio", r] for r in RATIOS.split(",")],
            "one-run-three-ratios": [["--ratio", RATIOS]],
        }
        results: dict[str, list[dict]] = {case: [] for case in cases}
        for i in range(args.repeats):  # interleaved: a shared machine's load hits every case alike
            for case, runs in cases.items():
                (tmp / case).mkdir(exist_ok=True)
                summaries = [run_compress([*base, *extra, "--out", str(tmp / case / str(j))], {})
                             for j, extra in enumerate(runs)]  # fmt: skip
                total = {"wall_s": sum(s["wall_s"] for s in summaries),
                         "peak_rss_mb": max(s["peak_rss_mb"] for s in summaries)}  # fmt: skip
                outputs = [o for s in summaries for o in s.get("outputs", [s])]  # several ratios: one each
                for key in PHASES:
                    total[key] = sum(o.get(key, 0.0) for o in outputs)
                results[case].append(total)
                print(f"repeat {i + 1}/{args.repeats} {case}: {total['wall_s']:.1f} s", file=sys.stderr)
            for a, b in (("fresh", "scores"), ("fresh-no-compensate", "scores-no-compensate")):
                assert kept(tmp / a / "0") == kept(tmp / b / "0"), f"{b} kept other neurons than {a}"
            for j, r in enumerate(RATIOS.split(",")):
                assert kept(tmp / "three-runs" / str(j)) == kept(tmp / "one-run-three-ratios" / "0" / f"r{r}")
    tags = run_tags("cpu")
    rows = []
    for case, res in results.items():
        med = {key: round(statistics.median(r[key] for r in res), 2) for key in ("wall_s", *PHASES)}
        rows.append({**tags, "model": args.model, "case": case, "repeats": args.repeats, **med,
                     "peak_rss_mb": round(max(r["peak_rss_mb"] for r in res), 1), "command": command})  # fmt: skip
    append_csv(args.out, rows)
    by_case = {r["case"]: r for r in rows}
    for row in rows:
        twin = {"scores": "fresh", "scores-no-compensate": "fresh-no-compensate",
                "one-run-three-ratios": "three-runs"}.get(row["case"])  # fmt: skip
        row["faster"] = f"{by_case[twin]['wall_s'] / row['wall_s']:.1f}x" if twin else ""
    cols = ["case", "wall_s", "probe_s", "stats_s", "compensate_s", "peak_rss_mb", "faster"]
    print(format_table(cols, [[row[c] for c in cols] for row in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
