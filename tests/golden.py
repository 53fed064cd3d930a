"""Golden outputs of ``prunenet compress``: what every method writes on every path, recorded once.

A record holds what a refactor must not change: the kept neurons, parameter counts, a hash of every
output tensor, the config, and the manifest without what differs between runs (timestamps, timings,
absolute paths). ``tests/test_golden.py`` runs the same commands and compares; a change that alters
any of it fails there.

Record again only when an output is meant to change, and say why in the commit:

    python tests/golden.py            # tiny models (about a minute)
    python tests/golden.py --embedded # the embedded SmolLM2-135M (a few minutes)

Float results (trained policies, self-calibration) are reproducible on one machine, not across CPU
types: the same policy training rounds differently on an Intel and an AMD CPU. Each record therefore
also holds the machine it was made on (CPU model, torch's CPU capability, torch version; see
:func:`machine`) and the hash of the source weights as generated there: where either differs, only the
machine-independent fields are compared (see ``EXACT_ANYWHERE`` and :func:`comparable`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from tiny_models import save_sharded

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
TINY_FILE = GOLDEN / "tiny.json"
EMBEDDED_FILE = GOLDEN / "embedded.json"

# The families recorded: the package's first thirteen (and Llama with MLP biases, GPT-2 with n_inner). Each
# later family is checked by the parametrized tests; these records guard the shared code paths.
FAMILIES = (
    "falcon", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt2-n_inner", "gpt_neox", "llama", "llama-mlp-bias",
    "mistral", "opt", "phi", "phi3", "qwen2", "qwen3",
)  # fmt: skip
# Attention slicing is implemented for these families (adapter.attention is set).
ATTENTION_FAMILIES = ("gemma", "gemma2", "gemma3_text", "llama", "mistral", "qwen2", "qwen3")
# Selection from weights alone, with no float arithmetic between the weights and the choice that could
# differ across CPUs: these records are compared in full anywhere.
EXACT_ANYWHERE = ("random",)
# Manifest fields that differ between runs of the same command.
VOLATILE = ("created", "timings_s", "source_path", "policy_source", "source_model")


def tensor_hashes(folder: Path) -> dict[str, str]:
    """``{name: sha256 of its bytes, dtype and shape}`` for every tensor of every safetensors file."""
    hashes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).contiguous()
                raw = t.reshape(-1).view(torch.uint8) if t.numel() else t
                h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(raw.numpy().tobytes())
                hashes[f"{path.name}:{name}"] = h.hexdigest()[:16]
    return hashes


def machine() -> dict:
    """What float results depend on besides the code: the CPU model, the instruction set torch's kernels
    use on it, and the torch version."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model or platform.processor(), "capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__}  # fmt: skip


def same_machine(recorded: dict, produced: dict, family: str) -> bool:
    """Whether a record may be compared in full: made on this kind of machine from the same source weights."""
    return (
        recorded.get("machine") == produced.get("machine")
        and recorded["sources"][family] == produced["sources"][family]
    )


def folder_digest(folder: Path) -> str:
    return hashlib.sha256(json.dumps(tensor_hashes(folder), sort_keys=True).encode()).hexdigest()[:16]


def record_of(out: Path) -> dict:
    """What a finished output holds that a refactor must keep."""
    manifest = json.loads((out / "prunenet.json").read_text())
    for key in VOLATILE:
        manifest.pop(key, None)
    config = json.loads((out / "config.json").read_text())
    config.pop("transformers_version", None)
    return {"manifest": manifest, "config": config, "tensors": tensor_hashes(out)}


def tiny_cases() -> list[tuple[str, str, list[str]]]:
    """``(case id, family, extra compress arguments)`` for every method x path on every tiny family."""
    cases = []
    for family in FAMILIES:
        cases += [
            (f"{family}/prunenet/memory", family, ["--method", "prunenet", "--episodes", "2", "--no-streaming"]),
            (
                f"{family}/prunenet-topk/memory",
                family,
                ["--method", "prunenet", "--episodes", "2", "--selection", "topk", "--no-streaming"],
            ),
            (
                f"{family}/prunenet/streaming",
                family,
                ["--method", "prunenet", "--episodes", "2", "--streaming", "--max-memory", "1GiB"],
            ),
            (f"{family}/random/memory", family, ["--method", "random", "--no-streaming"]),
            (f"{family}/random/streaming", family, ["--method", "random", "--streaming", "--max-memory", "1GiB"]),
            (f"{family}/magnitude/memory", family, ["--method", "magnitude", "--no-streaming"]),
            (f"{family}/magnitude/streaming", family, ["--method", "magnitude", "--streaming", "--max-memory", "1GiB"]),
            (f"{family}/selfcal/memory", family, ["--method", "selfcal"]),
            (f"{family}/selfcal/streaming", family, ["--method", "selfcal", "--streaming", "--max-memory", "1GiB"]),
        ]
        if family in ATTENTION_FAMILIES:
            cases.append(
                (
                    f"{family}/prunenet-attn/memory",
                    family,
                    ["--method", "prunenet", "--episodes", "2", "--modules", "ffn+attn"],
                )
            )
            cases.append(
                (
                    f"{family}/prunenet-attn/streaming",
                    family,
                    [
                        "--method",
                        "prunenet",
                        "--episodes",
                        "2",
                        "--modules",
                        "ffn+attn",
                        "--streaming",
                        "--max-memory",
                        "1GiB",
                    ],
                )
            )
    return cases


TORCHRUN_CASES = [
    ("llama/prunenet/torchrun-2", "llama", ["--method", "prunenet", "--episodes", "2", "--max-memory", "1GiB"]),
    ("llama/random/torchrun-2", "llama", ["--method", "random", "--max-memory", "1GiB"]),
    ("llama/magnitude/torchrun-2", "llama", ["--method", "magnitude", "--max-memory", "1GiB"]),
    ("llama/selfcal/torchrun-2", "llama", ["--method", "selfcal", "--max-memory", "1GiB"]),
]


def make_sources(root: Path, families) -> dict[str, Path]:
    """Each tiny family saved in several shards (seed 0), as the cases read them."""
    sources = {}
    for family in families:
        folder = root / "src" / family
        if not folder.exists():
            save_sharded(family, folder)
        sources[family] = folder
    return sources


def compress_args(source: Path, out: Path, extra: list[str], ratio: str = "0.25") -> list[str]:
    return ["compress", "--model", str(source), "--out", str(out), "--ratio", ratio, "--seed", "3", "--quiet", *extra]


def run_in_process(argv: list[str]) -> None:
    from prunenet.cli import main

    code = main(argv)
    if code != 0:
        raise RuntimeError(f"prunenet {' '.join(argv)} exited with {code}")


def run_torchrun(argv: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "prunenet", *argv, "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {' '.join(argv)} failed: {proc.stderr[-2000:]}")


def run_tiny(root: Path, cases=None, torchrun_cases=None) -> dict:
    """Run the tiny cases under ``root``; returns ``{"sources": {family: digest}, "cases": {id: record}}``."""
    cases = tiny_cases() if cases is None else cases
    torchrun_cases = TORCHRUN_CASES if torchrun_cases is None else torchrun_cases
    families = sorted({family for _, family, _ in [*cases, *torchrun_cases]})
    sources = make_sources(root, families)
    (root / "out").mkdir()
    records = {}
    for i, (case, family, extra) in enumerate(cases):
        out = root / "out" / f"{i}"
        run_in_process(compress_args(sources[family], out, extra))
        records[case] = record_of(out)
    for i, (case, family, extra) in enumerate(torchrun_cases):
        out = root / "out" / f"t{i}"
        run_torchrun(compress_args(sources[family], out, extra))
        records[case] = record_of(out)
    sources = {family: folder_digest(sources[family]) for family in families}
    return {"machine": machine(), "sources": sources, "cases": records}


EMBEDDED_CASES = [
    ("smollm2/prunenet/memory", ["--method", "prunenet", "--episodes", "2", "--no-streaming"]),
    ("smollm2/prunenet/streaming", ["--method", "prunenet", "--episodes", "2", "--streaming", "--max-memory", "4GiB"]),
    ("smollm2/random/streaming", ["--method", "random", "--streaming", "--max-memory", "4GiB"]),
    ("smollm2/magnitude/memory", ["--method", "magnitude", "--no-streaming"]),
    ("smollm2/selfcal/memory", ["--method", "selfcal"]),
    ("smollm2/selfcal/streaming-disk", ["--method", "selfcal", "--streaming", "--max-memory", "1GiB"]),
    ("smollm2/prunenet-attn/memory", ["--method", "prunenet", "--episodes", "2", "--modules", "ffn+attn"]),
]


def run_embedded(root: Path, cases=None) -> dict:
    """The embedded model's cases (ratio 0.2); the source digest is the converted model's."""
    from prunenet.models import DEFAULT_MODEL, ensure_default_model

    cases = EMBEDDED_CASES if cases is None else cases
    records = {}
    for i, (case, extra) in enumerate(cases):
        out = root / f"e{i}"
        argv = compress_args(Path(DEFAULT_MODEL), out, extra, ratio="0.2")
        argv[argv.index("--model") + 1] = DEFAULT_MODEL
        run_in_process(argv)
        records[case] = record_of(out)
    return {"machine": machine(), "sources": {"smollm2": folder_digest(ensure_default_model())}, "cases": records}


def as_installed_transformers_writes_it(config: dict) -> dict:
    """``config`` (a saved ``config.json``) loaded and written again by the installed transformers.

    A newer transformers fills in or renames fields of its own (5.25 writes Falcon's ``num_key_value_heads``);
    that is no change in what prunenet wrote, and both sides of a comparison go through this.
    """
    fields = dict(config)
    written = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields).to_dict()
    written.pop("transformers_version", None)
    return written


def comparable(case: str, record: dict, same: bool) -> dict:
    """The part of ``record`` to compare: all of it on the recording kind of machine (``same``, see
    :func:`same_machine`), elsewhere what does not depend on float rounding: for ``EXACT_ANYWHERE`` methods
    the whole manifest (kept neurons included), for the others the counts; the config always (as the
    installed transformers writes it)."""
    record = {**record, "config": as_installed_transformers_writes_it(record["config"])}
    if same:
        return record
    if case.split("/")[1] in EXACT_ANYWHERE:
        return {"manifest": record["manifest"], "config": record["config"]}
    m = record["manifest"]
    counts = {key: m.get(key) for key in ("ratio", "k", "ffn_width_before", "params_before", "params_after")}
    return {"counts": counts, "config": record["config"]}


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedded", action="store_true", help="record the embedded model's cases")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    GOLDEN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_embedded(Path(tmp)) if args.embedded else run_tiny(Path(tmp))
    path = EMBEDDED_FILE if args.embedded else TINY_FILE
    path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path} ({len(result['cases'])} cases)")


if __name__ == "__main__":
    main()
