"""Perplexity of a causal LM on real text."""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm


def tokenize_prefix(tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` tokens of ``text`` as ``(T,)`` int64 (fewer if the text is shorter).

    Tokenizes a character prefix that grows until it is long enough, so a 1 MB corpus is not
    tokenized whole to evaluate 4096 tokens.
    """
    chars = max_tokens * 8
    while True:
        # verbose=False: we window the ids ourselves, so the "longer than model_max_length" warning is moot.
        ids = tokenizer(text[:chars], add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        # A cut prefix may end in half a word; its tokens are the last few, so ask for a margin.
        if chars >= len(text) or len(ids) > max_tokens + 16:
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
        chars *= 2


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    max_tokens: int = 4096,
    context: int = 512,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Perplexity over the first ``max_tokens`` tokens of ``text``, in non-overlapping ``context``-token windows.

    Each window is scored independently (its first token has no prediction); the perplexity is
    ``exp`` of the mean next-token negative log-likelihood over all predicted tokens.

    Returns:
        ``{"perplexity", "nll", "tokens" (predicted tokens), "windows", "context", "parameters", "seconds"}``.
    """
    if context < 2:
        raise ValueError(f"--context must be at least 2, got {context}")
    ids = tokenize_prefix(tokenizer, text, max_tokens)
    if ids.numel() < 2:
        raise ValueError("the text is too short to evaluate (fewer than 2 tokens)")
    windows = list(torch.split(ids, context))
    if len(windows) > 1 and windows[-1].numel() < 2:
        windows = windows[:-1]
    model.eval()
    start = time.perf_counter()
    total_nll, total_tokens = 0.0, 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        # Windows of one batch share a length except possibly the last one: pad and mask it.
        length = max(w.numel() for w in batch)
        input_ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for row, w in enumerate(batch):
            input_ids[row, : w.numel()] = w
            mask[row, : w.numel()] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
        )
        valid = mask[:, 1:].reshape(-1).bool()
        total_nll += float(nll[valid].sum())
        total_tokens += int(valid.sum())
    mean_nll = total_nll / total_tokens
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": total_tokens,
        "windows": len(windows),
        "context": context,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - start,
    }
