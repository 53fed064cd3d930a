"""Optional attention slicing (``compress --modules ffn+attn``): remove whole key/value head groups.

Why whole groups. With grouped-query attention (GQA) a block has ``H`` query heads and ``KV`` key/value
heads; query heads ``[g * G, (g + 1) * G)`` (``G = H / KV``) all read key/value head ``g``. A value head's
output dimensions (rows of ``v_proj``) only reach the residual stream through the ``o_proj`` columns of
*its* query heads, so slicing value/output dimensions "one head group at a time" means removing, for a
group ``g``: the ``G * hd`` rows of ``q_proj``, the ``hd`` rows of ``k_proj`` and ``v_proj`` and the
``G * hd`` columns of ``o_proj`` (``hd`` = head size). Stock ``transformers`` can only describe attention
with whole heads of one size, the same in every layer, so every layer keeps the same number of groups
and the config records ``num_attention_heads = kept * G``, ``num_key_value_heads = kept`` and an explicit
``head_dim`` (which would otherwise be recomputed as ``hidden_size / num_attention_heads``). The ratio
``H / KV`` is unchanged, so the in-memory attention modules keep working without being rebuilt.

Which groups. The same calibration-free idea as the FFN policy: no text, only the weights, and the
spectral reward of the paper. For each layer, the groups are removed greedily one at a time; at each step
the group whose removal keeps the singular values of the out-projection ``o_proj`` (viewed as
``(H * hd, d)``: one row per head output dimension) closest to the original ones -- smallest
two-sample Kolmogorov-Smirnov statistic, i.e. highest reward ``1 / D`` -- is removed. The number of
groups is small (3 for SmolLM2-135M, 8 for Llama-3-8B, 32 for MHA models), so the greedy search costs at
most ``KV^2 / 2`` small SVDs per layer and needs no training.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .adapters import ATTENTION_MODEL_TYPES, ModelAdapter
from .adapters.base import AttentionShape
from .progress import progress_bar
from .reward import ks_statistic, singular_values
from .slicing import slice_linear_, validate_keeps
from .widths import kept_width

__all__ = [
    "AttentionShape",
    "check_modules",
    "choose_attention",
    "choose_groups",
    "group_entries",
    "kept_groups_count",
    "slice_attention_",
    "slice_attention_by_ratio_",
]


def check_modules(modules: str, adapter: ModelAdapter, config) -> None:
    """Raise ``ValueError`` unless the model family can slice what ``--modules`` asks (before loading weights;
    the value itself is :class:`~prunenet.config.PruneConfig`'s to check)."""
    if modules == "ffn+attn" and adapter.attention is None:
        supported = ", ".join(ATTENTION_MODEL_TYPES)
        raise ValueError(
            f"--modules ffn+attn is not supported for model type {config.model_type!r}: attention slicing is "
            f"implemented for {supported} (separate q/k/v/o projections). Use --modules ffn"
        )


def kept_groups_count(ratio: float, kv_heads: int) -> int:
    """Key/value groups kept at ``ratio``: ``floor((1 - ratio) * KV)``, at least 1."""
    return max(1, kept_width(ratio, kv_heads))


def _o_rows(o_weight: torch.Tensor) -> torch.Tensor:
    """``o_proj.weight`` ``(d, H * hd)`` as ``(H * hd, d)``: one row per head output dimension (a view)."""
    return o_weight.detach().t()


def group_rows(groups: Sequence[int], group_size: int, head_dim: int) -> torch.Tensor:
    """Rows of ``(H * hd, ...)`` belonging to KV groups ``groups`` (sorted), as sorted int64 ``(len * G * hd,)``."""
    span = group_size * head_dim
    return torch.cat([torch.arange(g * span, (g + 1) * span) for g in sorted(groups)])


def choose_groups(o_weight: torch.Tensor, shape: AttentionShape, keep: int) -> torch.Tensor:
    """The KV groups to keep in one layer, by greedy removal under the spectral reward.

    Args:
        o_weight: ``o_proj.weight``, ``(d, H * hd)``.
        shape: ``(H, KV, hd)``.
        keep: groups to keep, ``1 <= keep <= KV``.
    Returns:
        ``(keep,)`` sorted int64 group indices in ``[0, KV)``.
    """
    heads, kv, head_dim = shape
    rows = _o_rows(o_weight).float()
    full = singular_values(rows)
    kept = list(range(kv))
    while len(kept) > keep:
        best, best_ks = None, None
        for g in kept:  # ascending: ties go to the lowest group index (deterministic)
            trial = [h for h in kept if h != g]
            ks = float(ks_statistic(full, singular_values(rows[group_rows(trial, shape.group, head_dim)])))
            if best_ks is None or ks < best_ks:
                best, best_ks = g, ks
        kept.remove(best)
    return torch.tensor(kept, dtype=torch.int64)


@torch.no_grad()
def slice_attention_(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    kept: Sequence[torch.Tensor],
    progress: bool = True,
) -> None:
    """Keep only KV groups ``kept[i]`` in the attention of every block ``i`` of ``model``, in place.

    Args:
        model: a ``*ForCausalLM`` served by ``adapter`` (``adapter.attention`` not None).
        kept: per layer, ``(m,)`` sorted unique int64 group indices in ``[0, KV)``; the same ``m`` everywhere.

    The config afterwards says ``num_attention_heads = m * G``, ``num_key_value_heads = m`` and the
    unchanged ``head_dim``, so ``save_pretrained`` writes a model stock ``transformers`` reloads.
    """
    spec = adapter.attention
    config = model.config
    shape = adapter.attention_shape(config)
    m = validate_keeps(kept, adapter.num_layers(config), shape.kv_heads, what="attention KV groups", per="layers")
    for layer, groups in enumerate(progress_bar(kept, desc="slicing attention", unit="layer", enabled=progress)):
        block = adapter.block_prefix(layer)
        q_rows, kv_rows = group_entries(groups, shape)  # (m * G * hd,), (m * hd,)
        slice_linear_(model.get_submodule(block + spec.q), q_rows, 0)
        slice_linear_(model.get_submodule(block + spec.k), kv_rows, 0)
        slice_linear_(model.get_submodule(block + spec.v), kv_rows, 0)
        slice_linear_(model.get_submodule(block + spec.o), q_rows, 1)
    adapter.set_attention_heads(config, shape, m)


def group_entries(groups: torch.Tensor, shape: AttentionShape) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_rows, kv_rows)``: the rows of ``q_proj`` (``(H * hd, d)``; also the columns of ``o_proj``) and of
    ``k_proj``/``v_proj`` (``(KV * hd, d)``) that kept KV groups ``groups`` (sorted) own."""
    return group_rows(groups.tolist(), shape.group, shape.head_dim), group_rows(groups.tolist(), 1, shape.head_dim)


def choose_attention(o_weights: Iterable[torch.Tensor], shape: AttentionShape, ratio: float) -> tuple[list, dict]:
    """The KV groups every block keeps at ``ratio`` (:func:`choose_groups` on each ``o_proj.weight`` ``(d, H * hd)``,
    in layer order), and the manifest entry.

    Returns:
        ``(kept, info)``: per layer the sorted ``(m,)`` int64 groups, and ``{"heads_before", "kv_heads_before",
        "heads_after", "kv_heads_after", "head_dim", "selection", "kept_groups": [[group, ...] per layer]}``.
    """
    heads, kv, head_dim = shape
    m = kept_groups_count(ratio, kv)
    kept = [choose_groups(o_weight, shape, m) if m < kv else torch.arange(kv) for o_weight in o_weights]
    return kept, {
        "heads_before": heads,
        "kv_heads_before": kv,
        "heads_after": m * shape.group,
        "kv_heads_after": m,
        "head_dim": head_dim,
        "selection": "greedy removal of whole KV groups by the spectral (KS) reward of o_proj",
        "kept_groups": [g.tolist() for g in kept],
    }


def slice_attention_by_ratio_(
    model: torch.nn.Module, adapter: ModelAdapter, ratio: float, progress: bool = True
) -> dict:
    """Choose (:func:`choose_attention`) and remove KV groups at ``ratio`` in every block of ``model``, in place;
    returns the manifest entry."""
    o_weights = (model.get_submodule(adapter.block_prefix(i) + adapter.attention.o).weight
                 for i in range(adapter.num_layers(model.config)))  # fmt: skip
    kept, info = choose_attention(o_weights, adapter.attention_shape(model.config), ratio)
    slice_attention_(model, adapter, kept, progress=progress)
    return info
