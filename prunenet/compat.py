"""Shims over the transformers APIs that changed names between the versions prunenet supports."""

from __future__ import annotations

import inspect

import torch


def forward_with_cache(model: torch.nn.Module, input_ids: torch.Tensor, cache=None, **kwargs):
    """One forward pass that extends the key/value cache: ``(logits, cache)``.

    transformers 5.2x names the argument and the output field ``cache``, earlier versions
    ``past_key_values`` (now deprecated, with a warning on every call).
    """
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=input_ids, use_cache=True, **{name: cache}, **kwargs)
    return out.logits, getattr(out, name)
