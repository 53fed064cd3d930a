"""A (pruned) Hugging Face model folder written as one GGUF file that llama.cpp runs.

The tensors are read one at a time from the folder's safetensors (never the whole model in memory), renamed
with the ``gguf`` package's own tensor-name map, and written in float16 (1-D tensors, norms and biases, in
float32, as llama.cpp's converter does). The pruned FFN width is the model's ``feed_forward_length``: llama.cpp
reads every width from the tensors' shapes, so a pruned model needs nothing more than a dense one.

Quantized files (``q8_0``, ``q4_k_m``) are made from that float16 file by llama.cpp's own quantizer, through
``llama-cpp-python`` (the ``[gguf]`` extra). A matrix whose rows a type cannot split into its blocks (K-quants
need rows of a multiple of 256 values) gets the type llama.cpp itself falls back to; :class:`ExportResult`
counts those, and the summary says which rows caused it.

The file is written beside ``out`` and renamed into place when complete: a failed or interrupted export leaves
nothing behind, and an existing file is replaced (``overwrite``) only if an earlier export wrote it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:  # numpy and torch load when an export runs: `prunenet --help` imports this module
    import numpy as np
    import torch

MARKER_KEY = "prunenet.version"
"""GGUF metadata key every exported file carries: ``--overwrite`` replaces only a file that has it."""

QUANTS = {"f16": None, "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
"""``--quant`` choices: ``None`` is written here; the others name llama.cpp's file type for its quantizer."""

QUANT_HELP = (
    "f16 (written directly), q8_0 or q4_k_m (made from the f16 file by llama.cpp's quantizer: "
    "pip install 'prunenet[gguf]')"
)


class ExportError(ValueError):
    """The model or the request cannot be exported; the message says why in one line."""


@dataclasses.dataclass(frozen=True)
class Family:
    """How one ``model_type`` maps onto a llama.cpp architecture.

    ``arch``: the ``gguf.MODEL_ARCH`` member's name. ``interleave_rope``: llama.cpp's ``llama`` architecture
    rotates adjacent pairs of a head's query/key features, while Hugging Face's checkpoints are stored for
    rotating the two halves; the query and key rows are reordered to match (llama.cpp's converter does the same).
    """

    arch: str
    interleave_rope: bool = False


FAMILIES = {
    "llama": Family("LLAMA", interleave_rope=True),
    "mistral": Family("LLAMA", interleave_rope=True),
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
}
"""The families exported: dense decoders whose tensors and hyper-parameters llama.cpp reads as they are."""

_SKIPPED = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry; llama.cpp computes them


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_gguf` wrote.

    ``types``: GGML tensor type -> count over the file. ``fallbacks``: matrices that did not get the type
    ``quant`` asks for, by type given and the row lengths that caused it (``{"q5_0": [576, 51]}``).
    ``pre_tokenizer``: llama.cpp's pre-tokenizer that was verified to split text as transformers does, or ``None``
    (none did, or llama.cpp is not installed to check: the file names ``default``).
    """

    out: Path
    quant: str
    model_type: str
    arch: str
    hidden_size: int
    ffn_width: int
    tensors: int
    bytes: int
    types: dict[str, int]
    fallbacks: dict[str, list[int]]
    pre_tokenizer: str | None
    seconds: float


def is_byte_level_bpe(spec: dict) -> bool:
    """Whether ``spec`` (a parsed ``tokenizer.json``) is a byte-level BPE: what llama.cpp's ``gpt2`` tokenizer reads."""
    return (spec.get("model") or {}).get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))


def _bpe_vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """The byte-level BPE vocabulary of ``folder``'s tokenizer as llama.cpp's ``gpt2`` tokenizer model reads it:
    ``vocab_size`` tokens in id order with their ``gguf.TokenType``; ids the tokenizer does not use are padding.
    """
    import gguf

    spec_path = folder / "tokenizer.json"
    if not spec_path.is_file():
        raise ExportError(f"{folder} has no tokenizer.json: the GGUF file needs the model's tokenizer")
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    if not is_byte_level_bpe(spec):
        raise ExportError(
            f"the tokenizer in {folder} is not a byte-level BPE (GPT-2 style, as SmolLM2's, Llama 3's and Qwen's "
            "are); only those are exported to GGUF so far"
        )
    # The file's own vocabulary, not a tokenizer class's: a class chosen by model_type may add tokens of its own.
    by_id = {i: token for token, i in spec["model"]["vocab"].items()}
    added = {token["content"]: token.get("special", False) for token in spec.get("added_tokens", [])}
    by_id.update({token["id"]: token["content"] for token in spec.get("added_tokens", [])})
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _rope_theta(config) -> float:
    """RoPE's base from ``rope_parameters`` (transformers 5) or ``rope_theta``; other RoPE types are refused."""
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get("full_attention", params)  # per-attention-kind parameters: the full attention's
    kind = params.get("rope_type", "default")
    if kind not in ("default", None):
        raise ExportError(f"RoPE type {kind!r} is not exported to GGUF yet (only the default RoPE)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ExportError("the config has no rope_theta")
    return float(theta)


def _write_hyperparameters(writer, config, adapter, ffn_width: int) -> None:
    """The ``{arch}.*`` keys llama.cpp reads for a dense decoder (sizes through the family's adapter)."""
    shape = adapter.attention_shape(config)
    writer.add_block_count(adapter.num_layers(config))
    writer.add_context_length(adapter.context_length(config))
    writer.add_embedding_length(adapter.hidden_size(config))
    writer.add_feed_forward_length(ffn_width)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(adapter.vocab_size(config))


PRE_TOKENIZERS = ("llama-bpe", "smollm", "qwen2", "gpt-2", "deepseek-llm", "deepseek-v3", "olmo", "tekken",
                  "starcoder", "falcon", "gpt-4o", "default")  # fmt: skip
"""llama.cpp's names for the common byte-level BPE pre-tokenizers (the regex that splits text before BPE), tried in
this order; transformers' tokenizer.json does not name them."""

PROBE_TEXT = (
    "Hello world! I'm here, you're there; we'll see. It's 2026: 7 apples, 12 pears, 345 plums and 67890 grapes.\n"
    "  Indented   spaces\tand\ttabs\n\n"
    "def f(x):\n    return x ** 2  # squared\n"
    "Café, naïve, Zürich; Ελληνικά; Русский; 中文字符; 日本語; 한국어; emoji 🚀🎉. THE END... (really?!) <b>tag</b>"
)
"""The text a pre-tokenizer must split exactly as transformers does to be chosen: contractions, digit runs,
whitespace runs, code, accents, other scripts, emoji."""


@dataclasses.dataclass
class Vocabulary:
    """A byte-level BPE tokenizer as a GGUF file stores it, read once from the model folder.

    ``tokens``/``types``: every id's token and ``gguf.TokenType``; ``special``: a ``gguf.SpecialVocab`` (merges,
    special-token ids, whether to add bos, the chat template)."""

    tokens: list[str]
    types: list[int]
    special: object


def read_vocabulary(folder: Path, vocab_size: int) -> Vocabulary:
    import gguf

    tokens, types = _bpe_vocab(folder, vocab_size)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:  # llama.cpp refuses a BPE file without merges, and a GGUF array cannot be empty
        raise ExportError(f"the tokenizer in {folder} has no BPE merges; llama.cpp cannot load a BPE without any")
    return Vocabulary(tokens, types, special)


def _write_metadata(writer, name: str, config, adapter, width: int, vocab: Vocabulary, pre: str) -> None:
    """Every key of the file: name, the export marker, hyper-parameters, file type and tokenizer."""
    import gguf

    writer.add_name(name)
    writer.add_string(MARKER_KEY, __version__)
    _write_hyperparameters(writer, config, adapter, width)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    vocab.special.add_to_gguf(writer, quiet=True)


@contextlib.contextmanager
def _gguf_log_quiet() -> Iterator[None]:
    """``gguf``'s own log lines (file names, sizes, "little endian only") silenced: they are the summary's business."""
    gguf_log = logging.getLogger("gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        gguf_log.setLevel(level)


def choose_pre_tokenizer(
    folder: Path, config, adapter, width: int, vocab: Vocabulary, arch_name: str, scratch: Path
) -> str | None:
    """The first of :data:`PRE_TOKENIZERS` with which llama.cpp splits :data:`PROBE_TEXT` into the ids
    transformers gives, tried on vocabulary-only files in ``scratch``; ``None`` when none does or llama.cpp is not
    installed (the file then says ``default``, llama.cpp's GPT-2 style split)."""
    import gguf
    from transformers import AutoTokenizer

    try:
        import llama_cpp
    except ImportError:
        return None
    want = AutoTokenizer.from_pretrained(folder)(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    for pre in PRE_TOKENIZERS:
        path = scratch / f"vocab-{pre}.gguf"
        writer = gguf.GGUFWriter(path, arch_name)
        try:
            _write_metadata(writer, folder.name, config, adapter, width, vocab, pre)
            writer.write_header_to_file(path)
            writer.write_kv_data_to_file()
        finally:
            writer.close()
        try:
            with native_output_captured():
                loaded = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
            got = loaded.tokenize(PROBE_TEXT.encode(), add_bos=False, special=False)
        except (ValueError, RuntimeError):  # a name this llama.cpp does not know
            continue
        finally:
            path.unlink()
        if got == want:
            return pre
    return None


def _interleave_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a query/key projection ``(heads * head_dim, ...)`` (or its bias ``(heads * head_dim,)``) reordered
    from rotate-half layout (feature ``j`` pairs with ``j + head_dim/2``) to adjacent pairs (``2i`` with ``2i+1``)."""
    rest = weight.shape[1:]
    return weight.reshape(heads, 2, -1, *rest).transpose(1, 2).reshape(weight.shape)


def _tensor_plan(source, config, adapter, arch) -> list[tuple[str, str]]:
    """``(hf_name, gguf_name)`` for every tensor to write, in checkpoint order."""
    import gguf

    names = gguf.get_tensor_name_map(arch, adapter.num_layers(config))
    plan = []
    for name in source.entries:
        if name.endswith(_SKIPPED):
            continue
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp uses token_embd for the output when output.weight is absent
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ExportError(f"tensor {name!r} has no GGUF name for llama.cpp's {arch.name.lower()} architecture")
        plan.append((name, mapped))
    return plan


def _ffn_width(source, plan: list[tuple[str, str]], config, adapter) -> int:
    """The one FFN width every block has (llama.cpp's ``feed_forward_length``)."""
    widths = {source.entries[name].shape[-1] for name, mapped in plan if ".ffn_down." in mapped}
    if len(widths) != 1:
        raise ExportError(f"the FFN widths differ between blocks ({sorted(widths)}); llama.cpp needs one width")
    width = widths.pop()
    if width != adapter.ffn_width(config):
        raise ExportError(f"config.json says the FFN width is {adapter.ffn_width(config)}, the weights {width}")
    return width


def _as_array(tensor: torch.Tensor) -> np.ndarray:
    """float16 for matrices, float32 for vectors (norms and biases), as llama.cpp's converter stores them."""
    import torch

    dtype = torch.float16 if tensor.dim() > 1 else torch.float32
    return tensor.to(dtype).contiguous().numpy()


def _write_f16(folder: Path, path: Path, progress: bool) -> tuple[str, int, int, int, str | None]:
    """Write ``folder``'s model to ``path`` in float16; returns (llama.cpp architecture, hidden size, FFN width,
    tensors, the pre-tokenizer chosen by :func:`choose_pre_tokenizer`)."""
    import gguf
    import numpy as np
    from transformers import AutoConfig

    from .adapters import get_adapter
    from .progress import progress_bar
    from .streaming import CheckpointError, CheckpointSource

    config = AutoConfig.from_pretrained(folder)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ExportError(
            f"model_type {config.model_type!r} is not exported to GGUF yet; exported: {', '.join(sorted(FAMILIES))}"
        )
    arch = gguf.MODEL_ARCH[family.arch]
    adapter = get_adapter(config)
    try:
        source = CheckpointSource(folder)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    plan = _tensor_plan(source, config, adapter, arch)
    width = _ffn_width(source, plan, config, adapter)

    vocab = read_vocabulary(folder, adapter.vocab_size(config))
    with _gguf_log_quiet(), tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        pre = choose_pre_tokenizer(folder, config, adapter, width, vocab, gguf.MODEL_ARCH_NAMES[arch], Path(scratch))
    with _gguf_log_quiet(), contextlib.closing(gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])) as writer:
        _write_metadata(writer, folder.name, config, adapter, width, vocab, pre or "default")
        for name, mapped in plan:
            entry = source.entries[name]
            dtype = np.float16 if len(entry.shape) > 1 else np.float32
            nbytes = int(np.prod(entry.shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(mapped, list(entry.shape), np.dtype(dtype), nbytes)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        shape = adapter.attention_shape(config)
        heads = {"q_proj": shape.heads, "k_proj": shape.kv_heads}
        total = sum(source.entries[name].nbytes for name, _ in plan)
        with progress_bar(desc="GGUF f16", unit="B", total=total, unit_scale=True, enabled=progress) as bar:
            for name, _ in plan:
                tensor = source.read(name)
                projection = name.rsplit(".", 2)[-2]
                if family.interleave_rope and projection in heads:
                    tensor = _interleave_rope(tensor, heads[projection])
                writer.write_tensor_data(_as_array(tensor))
                bar.update(source.entries[name].nbytes)
    return arch.name.lower(), adapter.hidden_size(config), width, len(plan), pre


def _llama_cpp():
    """``llama_cpp`` (the ``[gguf]`` extra), or :class:`ExportError` saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            "quantized GGUF files are made by llama.cpp's quantizer: pip install 'prunenet[gguf]' "
            "(builds llama.cpp; or use --quant f16)"
        ) from None
    return llama_cpp


@contextlib.contextmanager
def native_output_captured() -> Iterator[list[str]]:
    """Capture what native code prints to file descriptors 1 and 2 (llama.cpp logs every tensor); the list it
    yields receives the captured text when the block ends."""
    captured: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = [os.dup(1), os.dup(2)]
        try:
            for fd in (1, 2):
                os.dup2(sink.fileno(), fd)
            yield captured
        finally:
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def _quantize(f16: Path, out: Path, quant: str) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``) from ``f16`` to ``out`` in ``quant``'s file type."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTS[quant])
    params.nthread = os.cpu_count() or 1
    with native_output_captured() as log:
        status = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params)
    if status != 0:
        tail = " | ".join(line.strip() for line in log[0].strip().splitlines()[-3:])
        raise ExportError(f"llama.cpp's quantizer failed (status {status}): {tail}")


def _target_types(quant: str) -> set[str]:
    """The types ``quant`` gives matrices when their rows fit its blocks (q4_k_m mixes Q4_K with Q5_K/Q6_K)."""
    return {"f16": {"F16"}, "q8_0": {"Q8_0"}, "q4_k_m": {"Q4_K", "Q5_K", "Q6_K"}}[quant]


def read_types(path: Path, quant: str) -> tuple[dict[str, int], dict[str, list[int]]]:
    """The GGML type of every tensor in ``path`` counted, and the matrices that fell back from ``quant``'s types:
    given type -> the sorted row lengths (the first dimension in GGML order) that needed it."""
    import gguf

    reader = gguf.GGUFReader(path)
    types: Counter[str] = Counter()
    fallbacks: dict[str, set[int]] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        types[kind] += 1
        if len(tensor.shape) > 1 and kind not in _target_types(quant):
            fallbacks.setdefault(kind, set()).add(int(tensor.shape[0]))
    return dict(types), {kind: sorted(rows) for kind, rows in fallbacks.items()}


BLOCK = {"f16": 1, "q8_0": 32, "q4_k_m": 256}
"""Values per block along a row for each ``--quant`` (llama.cpp's Q4_K_M falls back to 32-value blocks first)."""


def fallback_note(result: ExportResult) -> str | None:
    """One line on the matrices that fell back to another type, naming the rows that caused it and, where the FFN
    width did, the ``--width-multiple`` that avoids it; ``None`` when nothing fell back."""
    if not result.fallbacks:
        return None
    names = {result.hidden_size: "the hidden size", result.ffn_width: "the FFN width"}

    def rows(lengths: list[int]) -> str:
        return ", ".join(f"{n} ({names[n]})" if n in names else str(n) for n in lengths)

    note = "; ".join(f"{kind.lower()} for rows of {rows(lengths)}" for kind, lengths in result.fallbacks.items())
    note += f": {result.quant}'s blocks of {BLOCK[result.quant]} do not divide them (llama.cpp's own fallback)"
    if any(result.ffn_width in lengths for lengths in result.fallbacks.values()):
        note += f"; compress --width-multiple {BLOCK[result.quant]} gives an FFN width they divide"
        if result.quant == "q4_k_m" and result.ffn_width % 32:
            note += " (or 32, which llama.cpp's 32-value fallback types divide: q5_0 instead of f16)"
    return note


ALIGNED = 32
"""FFN widths llama.cpp runs at full speed are multiples of this: at others its prompt processing on F16 files
measured 0.54-0.89x of the dense model's (docs/results.md, ``benchmarks/inference_speed.py``)."""


def alignment_note(result: ExportResult) -> str | None:
    """One line when the FFN width is no multiple of :data:`ALIGNED` (and nothing fell back, which says more)."""
    if result.fallbacks or result.ffn_width % ALIGNED == 0:
        return None
    return (
        f"FFN width {result.ffn_width} is no multiple of {ALIGNED}: llama.cpp processed prompts at 0.54-0.89x "
        f"of the dense model's speed at such widths (measured); compress --width-multiple {ALIGNED} avoids it"
    )


def check_gguf_output(out: str | os.PathLike, model: Path, overwrite: bool) -> Path:
    """``out`` resolved: a ``.gguf`` path outside the model folder whose parent exists, and either absent or (with
    ``overwrite``) a file an earlier export wrote."""
    import gguf

    text = os.fspath(out)
    if not text.endswith(".gguf"):
        raise ExportError(f"--out must name a .gguf file, got {text!r}")
    path = Path(text).expanduser().resolve()
    if path.parent == model or model in path.parents:
        raise ExportError(f"--out {path} lies inside the model folder {model}; choose a path outside it")
    if not path.parent.is_dir():
        raise ExportError(f"the folder of --out does not exist: {path.parent}; create it first")
    if os.path.lexists(path):
        if not overwrite:
            raise ExportError(f"{path} exists; pass --overwrite to replace a file prunenet exported")
        try:
            ours = path.is_file() and MARKER_KEY in gguf.GGUFReader(path).fields
        except (ValueError, OSError):
            ours = False
        if not ours:
            raise ExportError(f"{path} was not written by prunenet export; it is left alone, choose another --out")
    return path


def export_gguf(
    model: str | os.PathLike, out: str | os.PathLike, quant: str = "f16", overwrite: bool = False,
    progress: bool = True,
) -> ExportResult:  # fmt: skip
    """Write the model folder ``model`` (safetensors, ``config.json``, ``tokenizer.json``) to the GGUF file ``out``.

    Args:
        model: a folder written by ``prunenet compress``, or any model folder of an exported family
            (:data:`FAMILIES`), or ``"smollm2-135m"``.
        out: the ``.gguf`` file to write (its folder must exist).
        quant: one of :data:`QUANTS`.
        overwrite: replace ``out`` if an earlier export wrote it (never another file).
        progress: report progress (a bar at a terminal, a line every 30 s in a log).

    Raises:
        ExportError: an unexported family or tokenizer, mixed FFN widths, a bad ``out``, or no ``llama_cpp`` for a
            quantized type; nothing is written.
    """
    from .resolve import resolve_model

    start = time.perf_counter()
    if quant not in QUANTS:
        raise ExportError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if QUANTS[quant] is not None:
        _llama_cpp()  # before any work
    folder = resolve_model(model)
    path = check_gguf_output(out, folder, overwrite)
    partials = [path.with_name(f".{path.name}.{os.getpid()}.{step}.partial") for step in ("f16", "quant")]
    try:
        arch, hidden, width, count, pre = _write_f16(folder, partials[0], progress)
        if QUANTS[quant] is not None:
            _quantize(partials[0], partials[1], quant)
            os.replace(partials[1], path)
        else:
            os.replace(partials[0], path)
    finally:
        for partial in partials:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
    types, fallbacks = read_types(path, quant)
    return ExportResult(
        out=path, quant=quant, model_type=_model_type(folder), arch=arch, hidden_size=hidden, ffn_width=width,
        tensors=count, bytes=path.stat().st_size, types=types, fallbacks=fallbacks, pre_tokenizer=pre,
        seconds=time.perf_counter() - start,
    )  # fmt: skip


def _model_type(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))["model_type"]
