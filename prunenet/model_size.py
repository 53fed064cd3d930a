"""How big a model in memory is: the elements and bytes a checkpoint of it stores.

One rule for every count the package reports (``compress``'s parameters before and after, ``eval``'s
parameters and weight bytes): every tensor ``save_pretrained`` writes -- the parameters and the persistent
buffers (Apertus's activation keeps two) -- each shared (tied) tensor once. A checkpoint on disk is counted
by the same rule from its header (:meth:`prunenet.streaming.CheckpointSource.numel`).
"""

from __future__ import annotations

import torch


def stored_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors a checkpoint of ``model`` stores: its state dict, each shared storage once."""
    unique: dict[int, torch.Tensor] = {}
    for tensor in model.state_dict().values():
        # Tied weights are one storage under two names. A meta tensor has no storage: keep each.
        key = tensor.data_ptr() if tensor.device.type != "meta" and tensor.numel() else id(tensor)
        unique.setdefault(key, tensor)
    return list(unique.values())


def count_parameters(model: torch.nn.Module) -> int:
    """Elements of the tensors a checkpoint of ``model`` stores (:func:`stored_tensors`)."""
    return sum(t.numel() for t in stored_tensors(model))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors a checkpoint of ``model`` stores, in their current dtypes."""
    return sum(t.numel() * t.element_size() for t in stored_tensors(model))
