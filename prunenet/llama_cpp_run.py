"""Running a GGUF file in llama.cpp (through ``llama-cpp-python``, the ``[gguf]`` extra): logits, perplexity on
given token ids, and prompt/decode speed. What the export's tests and ``benchmarks/inference_speed.py`` measure.

Token ids are given, not text: the same ids go to ``transformers`` and to llama.cpp, so a difference is the
model's, not the tokenizers'.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from .gguf_export import native_output_captured


def load(path: str | os.PathLike, n_ctx: int = 512, logits_all: bool = False, threads: int | None = None):
    """``llama_cpp.Llama`` over ``path`` on the CPU, quietly; ``logits_all``: keep every position's logits."""
    import llama_cpp

    threads = threads or os.cpu_count() or 1
    with native_output_captured():
        return llama_cpp.Llama(
            model_path=str(Path(path)), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
            n_threads=threads, n_threads_batch=threads, verbose=False,
        )  # fmt: skip


def logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits ``(len(ids), vocab)`` float32 for one sequence ``ids`` from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def perplexity(llm, windows: list[list[int]]) -> float:
    """exp of the mean next-token negative log-likelihood over ``windows`` (each scored from an empty cache, every
    position but the first predicted: what :func:`prunenet.perplexity` computes for non-overlapping windows)."""
    nll, count = 0.0, 0
    for ids in windows:
        scores = logits(llm, ids).astype(np.float64)
        top = scores.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(scores - top).sum(axis=1))
        targets = np.asarray(ids[1:])
        nll += float((log_z[:-1] - scores[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    return math.exp(nll / count)


def prompt_and_decode(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """Seconds to process ``prompt`` in one batch, and seconds per generated token for ``new_tokens`` greedy
    single-token steps after it (llama.cpp's two speeds: prompt processing and generation; ``nan`` for no steps)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return prefill, (time.perf_counter() - start) / new_tokens if new_tokens else float("nan")
