"""Perplexity against transformers' own loss, window by window, and invariance to batching."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_model, tiny_text, tiny_tokenizer

from prunenet.evaluate import perplexity, tokenize_prefix


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt"])
def test_perplexity_equals_transformers_loss_per_window(name):
    model, tokenizer, text = tiny_model(name), tiny_tokenizer(), tiny_text(1000)
    result = perplexity(model, tokenizer, text, max_tokens=250, context=64, batch_size=3, progress=False)
    ids = tokenize_prefix(tokenizer, text, 250)
    total, count = 0.0, 0
    with torch.no_grad():
        for window in torch.split(ids, 64):
            loss = model(window[None], labels=window[None]).loss  # mean over len - 1 predictions
            total += float(loss) * (window.numel() - 1)
            count += window.numel() - 1
    assert result["tokens"] == count == 250 - 4
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_batch_size_does_not_change_perplexity():
    model, tokenizer, text = tiny_model("llama"), tiny_tokenizer(), tiny_text(1000)
    results = [
        perplexity(model, tokenizer, text, max_tokens=300, context=70, batch_size=b, progress=False)["perplexity"]
        for b in (1, 2, 5)
    ]
    assert results[1] == pytest.approx(results[0], rel=1e-5) and results[2] == pytest.approx(results[0], rel=1e-5)


def test_tokenize_prefix_matches_tokenizing_everything():
    tokenizer, text = tiny_tokenizer(), tiny_text(5000)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenize_prefix(tokenizer, text, 777).tolist() == whole[:777]
    assert tokenize_prefix(tokenizer, text, 10**6).tolist() == whole  # more than the text has


def test_too_short_text_and_bad_context_are_rejected():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="too short"):
        perplexity(model, tokenizer, "w5", progress=False)
    with pytest.raises(ValueError, match="--context"):
        perplexity(model, tokenizer, tiny_text(100), context=1, progress=False)
