"""LoRA adapters through ``peft``: a model wrapped with them on every projection its family names, and merged back.

The targets are the FFN and attention projections the family's adapter lists
(:meth:`~prunenet.adapters.ModelAdapter.lora_targets`); merging folds ``alpha / r * B A`` into each
weight, so the result is an ordinary model of the same width that stock ``transformers`` loads without ``peft``.
"""

from __future__ import annotations

import torch

from .adapters import ModelAdapter
from .config import FinetuneConfig, FinetuneError


def require_peft():
    """The ``peft`` module; :class:`~prunenet.config.FinetuneError` saying how to install it when it is missing."""
    try:
        import peft
    except ImportError:
        raise FinetuneError(
            "recovery fine-tuning needs the peft package: `pip install 'prunenet[finetune]'` (or `pip install peft`)"
        ) from None
    return peft


def with_lora(model: torch.nn.Module, adapter: ModelAdapter, cfg: FinetuneConfig) -> tuple[torch.nn.Module, list]:
    """``model`` wrapped by ``peft`` with LoRA adapters (seeded) on every projection the adapter names."""
    peft = require_peft()
    targets = adapter.lora_targets()
    torch.manual_seed(cfg.seed)  # LoRA's A initialisation and dropout masks
    lora = peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        # GPT-2's Conv1D stores weights as (in, out).
        fan_in_fan_out=adapter.conv1d,
    )
    return peft.get_peft_model(model, lora), targets


def merge_lora(peft_model: torch.nn.Module) -> torch.nn.Module:
    """Fold the LoRA updates into the base weights (``W + alpha / r * B A``) and return the plain model."""
    return peft_model.merge_and_unload()


__all__ = ["merge_lora", "require_peft", "with_lora"]
