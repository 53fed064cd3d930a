"""What reading a large ``--calibration`` text costs: wall time and peak RSS of reading, checking and cutting the
windows of a 1 MB file, a 200 MB file and a folder of 10,000 files (32 KB each, 320 MB), each in a fresh
process, with the embedded model's tokenizer; and how the windows spread over the text.

    python benchmarks/calibration_memory.py            # about 2 min on 2 CPU cores (writes 520 MB under $TMPDIR)

Each row: the text, its size, the windows drawn (the default 8 x 128, and 1000 x 128 for the spread), wall time
and peak RSS of the child (``os.wait4``), the growth of peak RSS over the 1 MB text's, and how many of the text's
10 deciles (by byte position over all files in order) hold at least one window. Rows go to
``benchmarks/results/calibration_memory.csv`` (replaced) with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, run_tags, write_csv  # noqa: E402

WORDS = ("the", "state", "of", "union", "is", "strong", "and", "our", "economy", "grows", "every", "year")

CHILD = """
import json, sys, time
from prunenet.calibration import calibration_windows, read_calibration
from prunenet.embedded import ensure_default_model
from prunenet.models import read_tokenizer
tokenizer = read_tokenizer(ensure_default_model())
path, sequences = sys.argv[1], int(sys.argv[2])
tick = time.perf_counter()
text = read_calibration([path])
read_s = time.perf_counter() - tick
windows = calibration_windows(text, tokenizer, sequences, 128, 0)
cut_s = time.perf_counter() - tick - read_s
starts = {f.path: 0 for f in text.files}
total = 0
for f in text.files:
    starts[f.path] = total
    total += f.bytes
deciles = {min(9, 10 * (starts[w["file"]] + w["offset"]) // total) for w in windows.record["windows"]}
print(json.dumps({"read_s": read_s, "cut_s": cut_s, "deciles": len(deciles), "documents": text.documents}))
"""


def write_text(path: Path, size: int, seed: int) -> None:
    """``size`` bytes of numbered words: every window's place in the text is visible in its tokens."""
    written, i = 0, seed * 10**9
    with open(path, "w") as f:
        while written < size:
            chunk = " ".join(f"{WORDS[(i + j) % len(WORDS)]}{(i + j) % 997}" for j in range(2000)) + "\n"
            f.write(chunk)
            written += len(chunk)
            i += 2000


def run_child(path: Path, sequences: int) -> dict:
    """One fresh process reading ``path`` and drawing ``sequences`` windows; its timings and peak RSS."""
    tick = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(sequences)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - tick
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(err[-3000:])
    return {**json.loads(out.strip().splitlines()[-1]), "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration_memory.csv")
    args = parser.parse_args(argv)
    from prunenet.embedded import ensure_default_model

    ensure_default_model()  # convert once, untimed
    command = shlex.join(["python", "benchmarks/calibration_memory.py", *(argv if argv is not None else sys.argv[1:])])
    rows = []
    with tempfile.TemporaryDirectory(prefix="prunenet-calibration-") as tmp:
        tmp = Path(tmp)
        write_text(tmp / "small.txt", 1 << 20, 0)
        write_text(tmp / "large.txt", 200 << 20, 1)
        (tmp / "folder").mkdir()
        for i in range(10_000):
            write_text(tmp / "folder" / f"{i:05d}.txt", 20 << 10, 2 + i)
        texts = {"one 1 MB file": tmp / "small.txt", "one 200 MB file": tmp / "large.txt",
                 "10,000 files of 32 KB": tmp / "folder"}  # fmt: skip
        for name, path in texts.items():
            size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.iterdir()))
            for sequences in (8, 1000):
                result = run_child(path, sequences)
                rows.append({"text": name, "bytes": size, "windows": sequences, "documents": result["documents"],
                             "read_s": round(result["read_s"], 2), "cut_s": round(result["cut_s"], 2),
                             "wall_s": round(result["wall_s"], 2), "peak_rss_mb": round(result["peak_rss_mb"], 1),
                             "deciles_with_a_window": result["deciles"]})  # fmt: skip
                print(rows[-1], file=sys.stderr)
    base = {r["windows"]: r["peak_rss_mb"] for r in rows if r["text"] == "one 1 MB file"}
    tags = run_tags("cpu")
    rows = [{**tags, **r, "rss_over_1mb_mb": round(r["peak_rss_mb"] - base[r["windows"]], 1), "command": command}
            for r in rows]  # fmt: skip
    write_csv(args.out, rows)
    for r in rows:
        print(f"{r['text']:>22} {r['windows']:>5} windows: read {r['read_s']} s, cut {r['cut_s']} s, peak "
              f"{r['peak_rss_mb']} MB (+{r['rss_over_1mb_mb']}), deciles {r['deciles_with_a_window']}/10")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
