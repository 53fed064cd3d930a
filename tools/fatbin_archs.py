"""List the GPU code embedded in a shared library and check that the required cubins are there.

Usage: python tools/fatbin_archs.py LIB.so --require sm_80 sm_90

Used by ``make cuda-check``. With ``cuobjdump`` on PATH (or in $CUDA_HOME/bin) it runs
``cuobjdump --list-elf --list-ptx``; otherwise (a compiler-only toolkit, as the nvidia-cuda-nvcc
wheels give, has no cuobjdump) it reads the ``.nv_fatbin`` section of the ELF file itself: nvcc
embeds one fat binary per .cu file, a 16-byte header (magic 0xBA55ED50, header size, payload size)
followed by entries, each with a header giving its kind (1 PTX, 2 ELF cubin), its size and its
target architecture (80 for sm_80). Prints one summary line; exits 1 when a required cubin is missing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
KINDS = {1: "ptx", 2: "elf"}


def _section(data: bytes, name: bytes) -> bytes:
    """The contents of the named section of a 64-bit little-endian ELF file (b'' if absent)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off, strtab_size = headers[shstrndx][4], headers[shstrndx][5]
    strtab = data[strtab_off : strtab_off + strtab_size]
    for sh_name, _type, _flags, _addr, offset, size in headers:
        if strtab[sh_name : strtab.index(b"\0", sh_name)] == name:
            return data[offset : offset + size]
    return b""


def parse_fatbin(section: bytes) -> list[tuple[str, str]]:
    """(kind, 'sm_NN') for every entry of every fat binary in a .nv_fatbin section."""
    images = []
    pos = 0
    while pos + 16 <= len(section):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", section, pos)
        if magic != FATBIN_MAGIC:  # padding between containers
            pos += 8
            continue
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry + 32 <= end:
            kind, _v, entry_header_size, payload_size = struct.unpack_from("<HHIQ", section, entry)
            (arch,) = struct.unpack_from("<I", section, entry + 28)
            images.append((KINDS.get(kind, f"kind{kind}"), f"sm_{arch}"))
            entry += entry_header_size + payload_size
        pos = end
    return images


def with_cuobjdump(cuobjdump: str, lib: Path) -> list[tuple[str, str]]:
    out = subprocess.run([cuobjdump, "--list-elf", "--list-ptx", str(lib)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {out.stderr.strip()}")
    # "ELF file    1: _C....1.sm_80.cubin", "PTX file    1: _C....1.sm_90.ptx"
    return [(k.lower(), a) for k, a in re.findall(r"^(ELF|PTX) file.*\.(sm_\d+a?)\.\w+$", out.stdout, re.M)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lib", type=Path)
    ap.add_argument("--require", nargs="*", default=[], metavar="sm_NN", help="cubins that must be present")
    args = ap.parse_args(argv)

    cuda_bin = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin")
    cuobjdump = shutil.which("cuobjdump") or shutil.which("cuobjdump", path=cuda_bin)
    if cuobjdump:
        images, tool = with_cuobjdump(cuobjdump, args.lib), "cuobjdump --list-elf --list-ptx"
    else:
        images, tool = parse_fatbin(_section(args.lib.read_bytes(), b".nv_fatbin")), ".nv_fatbin headers"
    elf = sorted({a for k, a in images if k == "elf"}, key=lambda a: int(re.sub(r"\D", "", a)))
    ptx = sorted({a for k, a in images if k == "ptx"}, key=lambda a: int(re.sub(r"\D", "", a)))
    missing = [a for a in args.require if a not in elf]
    status = f"MISSING cubins: {' '.join(missing)}" if missing else "OK"
    print(
        f"cuda-check: {args.lib.name}: cubins {' '.join(elf) or 'none'}; PTX {' '.join(ptx) or 'none'} "
        f"({len(images)} images, read with {tool}) -> {status}"
    )
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
