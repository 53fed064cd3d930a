"""Reading and writing safetensors files one tensor at a time, with bounded memory.

The ``safetensors`` library loads (``safe_open(...).get_tensor``) or saves (``save_file``) whole
tensors through a dict, so writing a shard means holding all of it. Streaming compression of a
7B-70B checkpoint must hold at most one tensor, so this module reads and writes the format itself.
The format is small and stable (https://github.com/huggingface/safetensors#format):

    8 bytes   little-endian u64 N: length of the header
    N bytes   UTF-8 JSON: {name: {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}, ...,
              "__metadata__": {str: str}}  (offsets relative to the end of the header; padded with
              spaces so the data starts 8-byte aligned)
    rest      the tensors' bytes, row-major, little-endian, packed without holes

Reads use ``readinto`` on plain files rather than ``mmap``: the bytes land in a tensor we own, and
pages of the file we have finished with are page cache, not resident memory of this process (an
``mmap`` view would count every page it touched in the process's RSS until it is unmapped).
Files written here load with ``safetensors.safe_open`` and stock ``transformers``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# The header is at most 100 MB in the reference implementation; a larger one means a corrupt file.
MAX_HEADER_BYTES = 100_000_000
# Chunk for byte copies when the kernel cannot copy file to file (copy_file_range unsupported).
COPY_CHUNK_BYTES = 16 << 20


class SafetensorsFormatError(ValueError):
    """A file is not a valid safetensors file (bad header, truncated, holes or overlaps)."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file.

    Attributes:
        path: the file.
        dtype: its torch dtype.
        shape: its shape.
        start: absolute byte offset of its data in the file.
        nbytes: length of its data in bytes.
    """

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse a safetensors file's header: ``({name: entry} in file order, metadata)``.

    Raises:
        SafetensorsFormatError: the header is malformed, a tensor's bytes do not match its shape
            and dtype, tensors overlap or leave holes, or the file is shorter than the header says.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsFormatError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsFormatError(f"{path}: header length {header_len} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsFormatError(f"{path}: the header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    entries: list[tuple[str, TensorEntry, int]] = []
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise SafetensorsFormatError(f"{path}: bad header entry for {name!r}: {err!r}") from None
        entry = TensorEntry(path, dtype, shape, data_start + begin, end - begin)
        if end < begin or entry.nbytes != entry.numel * dtype.itemsize:
            raise SafetensorsFormatError(f"{path}: {name!r} has {end - begin} bytes for shape {shape} {dtype}")
        entries.append((name, entry, begin))
    entries.sort(key=lambda e: e[2])
    expected = 0
    for name, entry, begin in entries:
        if begin != expected:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} starts at {begin}, expected {expected}")
        expected = begin + entry.nbytes
    if data_start + expected > size:
        raise SafetensorsFormatError(f"{path}: truncated: the header needs {data_start + expected} bytes, got {size}")
    return {name: entry for name, entry, _ in entries}, dict(metadata)


def _read_exactly(f, view: memoryview, entry: TensorEntry) -> None:
    """Fill ``view`` from ``f``'s position on."""
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise SafetensorsFormatError(f"{entry.path}: unexpected end of file reading {entry.nbytes} bytes")
        done += got


def read_tensor(entry: TensorEntry, file=None) -> torch.Tensor:
    """The tensor at ``entry``, read into a new CPU tensor (``file``: an open binary file to reuse)."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.nbytes == 0:
        return out
    own = file is None
    f = open(entry.path, "rb", buffering=0) if own else file
    try:
        f.seek(entry.start)
        _read_exactly(f, memoryview(out.view(-1).view(torch.uint8).numpy()), entry)
    finally:
        if own:
            f.close()
    return out


def read_chunks(entry: TensorEntry, file=None, chunk_bytes: int = COPY_CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """The tensor at ``entry`` as consecutive flat pieces of its dtype, at most ``chunk_bytes`` each, read into
    one reused buffer: each piece is valid only until the next one is read. Reading a tensor this way (to
    check it) holds ``chunk_bytes``, not the tensor (an embedding can be ten times an FFN tensor)."""
    if entry.nbytes == 0:
        return
    step = max(1, chunk_bytes // entry.dtype.itemsize) * entry.dtype.itemsize
    buffer = torch.empty(min(step, entry.nbytes), dtype=torch.uint8)
    own = file is None
    f = open(entry.path, "rb", buffering=0) if own else file
    try:
        f.seek(entry.start)
        for begin in range(0, entry.nbytes, step):
            piece = buffer[: min(step, entry.nbytes - begin)]
            _read_exactly(f, memoryview(piece.numpy()), entry)
            yield piece.view(entry.dtype)
    finally:
        if own:
            f.close()


def copy_bytes(src, src_offset: int, dst, nbytes: int) -> None:
    """Append ``nbytes`` of ``src`` from ``src_offset`` to ``dst`` (both open binary files), bit for bit.

    Uses ``os.copy_file_range`` (the kernel copies; no user-space buffer) when it can, else a
    16 MiB buffer.
    """
    dst.flush()
    remaining, offset = nbytes, src_offset
    if hasattr(os, "copy_file_range"):
        try:
            dst_offset = dst.tell()
            while remaining:
                done = os.copy_file_range(src.fileno(), dst.fileno(), remaining, offset, dst_offset)
                if done == 0:
                    raise SafetensorsFormatError(f"unexpected end of file copying {nbytes} bytes")
                remaining, offset, dst_offset = remaining - done, offset + done, dst_offset + done
            dst.seek(dst_offset)
            return
        except OSError:  # e.g. EXDEV on old kernels, or a file system without support: fall back
            pass
    src.seek(offset)
    while remaining:
        chunk = src.read(min(remaining, COPY_CHUNK_BYTES))
        if not chunk:
            raise SafetensorsFormatError(f"unexpected end of file copying {nbytes} bytes")
        dst.write(chunk)
        remaining -= len(chunk)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, dtype and shape (the bytes come later, in this order)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class StreamingWriter:
    """Write a safetensors file whose tensors arrive one at a time, in a declared order.

    The header (names, dtypes, shapes, offsets) is written first from ``specs``; then each tensor's
    bytes are appended with :meth:`write` (a tensor) or :meth:`copy_from` (a byte range of another
    file, copied unchanged). :meth:`close` checks that every declared tensor arrived.

    Args:
        path: the file to create (truncated if it exists).
        specs: every tensor of the file, in the order its bytes will be written.
        metadata: the header's ``__metadata__`` (string to string).
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.path}: duplicate tensor names")
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for spec in self.specs:
            header[spec.name] = {
                "dtype": DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data 8-byte aligned, as the reference writer does
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def _expect(self, name: str, nbytes: int) -> TensorSpec:
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path}: {name!r} is one tensor too many")
        spec = self.specs[self._next]
        if spec.name != name or spec.nbytes != nbytes:
            raise ValueError(f"{self.path}: expected {spec.name!r} ({spec.nbytes} bytes), got {name!r} ({nbytes})")
        self._next += 1
        return spec

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (CPU; its declared dtype and shape)."""
        spec = self._expect(name, tensor.numel() * tensor.element_size())
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{self.path}: {name!r} is {tensor.dtype} {tuple(tensor.shape)}, declared {spec}")
        t = tensor.detach().cpu().contiguous()
        if t.numel():
            self._file.write(memoryview(t.view(-1).view(torch.uint8).numpy()))

    def copy_from(self, name: str, entry: TensorEntry, src=None) -> None:
        """Append the bytes of ``entry`` (a tensor of another safetensors file) unchanged."""
        self._expect(name, entry.nbytes)
        own = src is None
        f = open(entry.path, "rb") if own else src
        try:
            copy_bytes(f, entry.start, self._file, entry.nbytes)
        finally:
            if own:
                f.close()

    def close(self) -> None:
        """Flush to disk (``fsync``) and close; raises if declared tensors are missing."""
        try:
            if self._next != len(self.specs):
                missing = [s.name for s in self.specs[self._next :]]
                raise ValueError(f"{self.path}: {len(missing)} declared tensors were not written: {missing[:3]}")
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abort(self) -> None:
        """Close without checks (the caller deletes the file)."""
        self._file.close()

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
