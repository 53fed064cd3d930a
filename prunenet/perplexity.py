"""Next-token perplexity of a causal LM on a text, in (optionally sliding) windows of its first tokens.

* :func:`perplexity`: over the first ``max_tokens`` tokens of a text, in ``context``-token windows
  (non-overlapping by default, or a sliding window with ``stride``).
* :func:`tokenize_prefix`, :func:`document_prefix`, :func:`sliding_windows`: its pieces (the first one is
  also the prompt of :func:`prunenet.inference_cost.inference_cost`).
"""

from __future__ import annotations

import math
import time

import torch

from .config import EvalConfig, check_max_tokens, check_perplexity_options, check_windows
from .model_size import count_parameters
from .progress import progress_bar


def tokenize_prefix(tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` tokens of ``text`` as ``(T,)`` int64 (fewer if the text is shorter).

    Tokenizes a character prefix that grows until it is long enough, so a 1 MB corpus is not
    tokenized whole to evaluate 4096 tokens.
    """
    check_max_tokens(max_tokens)  # below 1 the prefix would never grow
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
    check_windows(context, stride)
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


def _batch_inputs(
    batch: list[tuple[int, int, int]], ids: torch.Tensor, prefix: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, scored)``, each ``(B, P + L)``, for a batch of ``B`` windows of ``ids``.

    Every row is ``prefix`` (``(P,)``) then its window's tokens, right-padded with 0 to the longest window
    ``L`` (only the last batch has a shorter window) and masked there; ``scored`` marks the positions
    whose tokens the window predicts.
    """
    p = prefix.numel()
    length = p + max(end - begin for begin, end, _ in batch)
    input_ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    scored = torch.zeros(len(batch), length, dtype=torch.bool)
    for row, (begin, end, first) in enumerate(batch):
        input_ids[row, :p] = prefix
        input_ids[row, p : p + end - begin] = ids[begin:end]
        mask[row, : p + end - begin] = 1
        scored[row, p + first - begin : p + end - begin] = True
    return input_ids, mask, scored


def _scored_nll(model, input_ids: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of the ``scored`` positions of a ``(B, S)`` batch, and
    their count. ``input_ids`` and ``mask`` are on the model's device; ``scored`` may be anywhere."""
    logits = model(input_ids=input_ids, attention_mask=mask).logits.float()  # (B, S, V)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    )  # (B * (S - 1),): position t predicts token t + 1
    valid = scored[:, 1:].reshape(-1).to(nll.device)
    return float(nll[valid].sum()), int(valid.sum())


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    max_tokens: int = EvalConfig.max_tokens,
    context: int = EvalConfig.context,
    stride: int | None = EvalConfig.stride,
    batch_size: int = EvalConfig.batch_size,
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
    check_perplexity_options(max_tokens, context, stride, batch_size)
    ids = tokenize_prefix(tokenizer, text, max_tokens)
    if ids.numel() < 2:
        raise ValueError("the text is too short to evaluate (fewer than 2 tokens)")
    windows = sliding_windows(ids.numel(), context, stride)
    prefix = torch.tensor(document_prefix(tokenizer), dtype=torch.long)
    model.eval()
    start = time.perf_counter()
    total_nll, total_tokens = 0.0, 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in progress_bar(batches, desc="perplexity", unit="batch", enabled=progress):
        input_ids, mask, scored = _batch_inputs(batch, ids, prefix)
        nll, tokens = _scored_nll(model, input_ids.to(device), mask.to(device), scored)
        total_nll += nll
        total_tokens += tokens
    mean_nll = total_nll / total_tokens
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": total_tokens,
        "windows": len(windows),
        "context": context,
        "stride": stride,
        "prefix_tokens": prefix.numel(),
        "parameters": count_parameters(model),
        "seconds": time.perf_counter() - start,
    }
