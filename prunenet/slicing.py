"""Applying kept FFN neurons to an instantiated model.

Each neuron-indexed parameter (see :class:`~prunenet.adapters.NeuronTensor`) is gathered along
its neuron axis; the config's FFN width becomes ``k``, so the result is an ordinary model of a
smaller intermediate size that stock ``transformers`` reloads.

Rows (axis 0) go through :func:`prunenet._ext.gather_rows`, the native op when the extension is
built and the pure-PyTorch ``index_select`` otherwise; columns use ``index_select``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from . import _ext
from .adapters import ModelAdapter, NeuronTensor


def gather_neurons(tensor: torch.Tensor, spec: NeuronTensor, keep: torch.Tensor, width: int) -> torch.Tensor:
    """A new contiguous tensor holding only the kept neurons of ``tensor`` along ``spec.axis``.

    Args:
        tensor: the stored parameter, e.g. ``(n, d)`` in-projection or ``(d, n)`` out-projection.
        spec: where the neurons are in ``tensor``.
        keep: ``(k,)`` sorted int64 kept neurons.
        width: the current FFN width ``n``.
    """
    expected = spec.groups * width
    if tensor.shape[spec.axis] != expected:
        raise ValueError(
            f"{spec.name}: expected {expected} entries on axis {spec.axis} (FFN width {width}), "
            f"got shape {tuple(tensor.shape)}"
        )
    index = spec.indices(keep.to(tensor.device), width)
    if spec.axis == 0:
        return _ext.gather_rows(tensor, index)
    return tensor.index_select(spec.axis, index).contiguous()


def validate_keeps(keeps: Sequence[torch.Tensor], num_layers: int, width: int) -> int:
    """Check kept-neuron vectors (one per layer, equal length, sorted, unique, in range); return ``k``."""
    if len(keeps) != num_layers:
        raise ValueError(f"got kept neurons for {len(keeps)} layers, the model has {num_layers}")
    k = keeps[0].numel()
    for layer, keep in enumerate(keeps):
        if keep.dtype != torch.int64 or keep.dim() != 1 or keep.numel() != k:
            raise ValueError(f"layer {layer}: kept neurons must be a 1-D int64 tensor of length {k}")
        if k and (keep[0] < 0 or keep[-1] >= width or not bool((keep[1:] > keep[:-1]).all())):
            raise ValueError(f"layer {layer}: kept neurons must be sorted, unique and in [0, {width})")
    if k == 0:
        raise ValueError("cannot keep zero FFN neurons")
    return k


@torch.no_grad()
def slice_model_(model: torch.nn.Module, adapter: ModelAdapter, keeps: Sequence[torch.Tensor], progress=True) -> None:
    """Keep only neurons ``keeps[i]`` in the FFN of every block ``i`` of ``model``, in place.

    Args:
        model: a ``*ForCausalLM`` model served by ``adapter``.
        keeps: one sorted ``(k,)`` int64 vector per layer (same ``k`` everywhere).
    """
    config = model.config
    width = adapter.ffn_width(config)
    k = validate_keeps(keeps, adapter.num_layers(config), width)
    for layer, keep in enumerate(tqdm(keeps, desc="slicing layers", unit="layer", disable=not progress)):
        for spec, param in adapter.neuron_parameters(model, layer):
            param.data = gather_neurons(param.data, spec, keep, width)
            _sync_module_shape(model, adapter.block_prefix(layer) + spec.name, param)
    adapter.set_ffn_width(config, k)


def _sync_module_shape(model: torch.nn.Module, param_name: str, param: torch.Tensor) -> None:
    """Keep ``in_features``/``out_features`` (``nn.Linear``) and ``nf`` (GPT-2 ``Conv1D``) truthful."""
    module_name, _, attr = param_name.rpartition(".")
    if attr != "weight":
        return
    module = model.get_submodule(module_name)
    if isinstance(module, torch.nn.Linear):
        module.out_features, module.in_features = param.shape
    elif hasattr(module, "nf"):
        module.nf = param.shape[1]
