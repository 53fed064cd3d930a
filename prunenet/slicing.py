"""Slicing FFN neurons out of weights: the fused in-place op and its pure-PyTorch reference.

:func:`slice_ffn_` compacts one FFN's neuron-indexed tensors in place, through the native op
``torch.ops.prunenet.slice_ffn_`` (bounded extra memory: a few MiB of scratch) when the extension is
built, or by replacing each tensor in turn with its ``index_select`` copy otherwise.
:func:`slice_model_` applies kept neurons to every block of an instantiated model; the config's FFN
width becomes ``k``, so the result is an ordinary model of a smaller intermediate size that stock
``transformers`` reloads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import ops
from .adapters import ModelAdapter
from .adapters.base import neuron_entries
from .progress import progress_bar

__all__ = [
    "BACKENDS",
    "slice_experts_",
    "slice_experts_ref",
    "slice_ffn_",
    "slice_ffn_ref",
    "slice_linear_",
    "slice_model_",
    "validate_keeps",
]

BACKENDS = ("auto", "native", "torch")
# Scratch of the native op: bounds its extra memory (plus, on CPU, page rounding). 4 MiB is < 2% of
# one LLaMA-2-7B FFN in fp16 and large enough that the copies through it run in parallel.
DEFAULT_SCRATCH_BYTES = 4 << 20


def _neuron_index(tensor: torch.Tensor, dim: int, keep: torch.Tensor, width: int) -> torch.Tensor:
    """Entries of ``tensor`` along ``dim`` to keep: ``keep + g * width`` for each group ``g`` (sorted)."""
    groups, rest = divmod(tensor.shape[dim], width)
    if rest or groups == 0:
        raise ValueError(f"shape {tuple(tensor.shape)}: dim {dim} is not a positive multiple of width {width}")
    return neuron_entries(keep.to(tensor.device), width, groups)


def slice_ffn_ref(
    rows: Sequence[torch.Tensor], cols: Sequence[torch.Tensor], keep: torch.Tensor, width: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Reference of :func:`slice_ffn_`, out of place: new contiguous tensors, inputs untouched.

    Args:
        rows: tensors with neurons on dim 0: ``(g*n, d)`` weights or ``(g*n,)`` biases; with ``g > 1``
            groups (a fused projection), neuron ``j`` is entry ``j + i*n`` of group ``i``.
        cols: tensors with neurons on dim 1: ``(d, g*n)``.
        keep: ``(k,)`` sorted, unique int64 neurons in ``[0, n)``.
        width: ``n``.

    Returns:
        ``(rows', cols')``: ``(g*k, d)`` / ``(g*k,)`` and ``(d, g*k)`` tensors.
    """
    gather = lambda t, dim: t.index_select(dim, _neuron_index(t, dim, keep, width)).contiguous()  # noqa: E731
    return [gather(t, 0) for t in rows], [gather(t, 1) for t in cols]


def _ran_native(op: str, takes, rows, cols, keep, width: int, backend: str, scratch_bytes: int | None) -> bool:
    """Runs ``torch.ops.prunenet.<op>`` when ``backend`` is ``"native"``, or ``"auto"`` and ``takes(rows, cols,
    keep)``; returns whether it ran (``False``: the caller takes the torch path)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not takes(rows, cols, keep)):
        return False
    ops.require()
    scratch = DEFAULT_SCRATCH_BYTES if scratch_bytes is None else scratch_bytes
    getattr(torch.ops.prunenet, op)(rows, cols, keep, width, scratch)
    return True


@torch.no_grad()
def slice_ffn_(
    rows: Sequence[torch.Tensor],
    cols: Sequence[torch.Tensor],
    keep: torch.Tensor,
    width: int,
    *,
    backend: str = "auto",
    scratch_bytes: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keep only neurons ``keep`` of one FFN, in place: the same tensor objects get the new shapes.

    Args:
        rows: tensors with neurons on dim 0 (in-projection weights ``(g*n, d)``, their biases
            ``(g*n,)``, GPT-2's ``c_proj`` ``(n, d)``); ``g > 1`` for fused projections (Phi-3's
            ``gate_up_proj``: rows ``j`` and ``n + j`` are one neuron).
        cols: tensors with neurons on dim 1 (out-projection weights ``(d, g*n)``, GPT-2's ``c_fc``).
        keep: ``(k,)`` sorted, unique int64 neurons in ``[0, n)``.
        width: ``n``, the current FFN width.
        backend: ``"native"``: the fused op ``torch.ops.prunenet.slice_ffn_`` (error if unavailable);
            ``"torch"``: each tensor replaced in turn by its ``index_select`` copy (peak: one extra
            sliced tensor); ``"auto"``: native when the extension is built and takes these inputs
            (float32/float16/bfloat16 on CPU, or CUDA when built with it; one dtype; contiguous or
            row-strided), unless ``PRUNENET_DISABLE_EXT=1``.
        scratch_bytes: the native op's scratch size (default 4 MiB).

    Returns:
        ``(rows, cols)``, the same tensors, now ``(g*k, ...)`` / ``(d, g*k)``. Pass the tensors
        themselves (e.g. ``nn.Parameter``), not ``.data`` or ``.detach()`` views: the new shape
        would reach only the view, leaving the original over compacted memory (and some torch
        versions refuse to change such a view's shape).

    Raises:
        ValueError: bad ``backend``; RuntimeError: bad ``keep`` or shapes (nothing is modified).
    """
    rows, cols = list(rows), list(cols)
    if _ran_native("slice_ffn_", ops.native_slice_ok, rows, cols, keep, width, backend, scratch_bytes):
        return rows, cols
    validate_keeps([keep], 1, width)
    for t, dim in [(t, 0) for t in rows] + [(t, 1) for t in cols]:
        # One tensor at a time: the old storage is freed (if nothing else holds it) before the next copy.
        t.set_(t.index_select(dim, _neuron_index(t, dim, keep, width)).contiguous())
    return rows, cols


def _expert_index(keep: torch.Tensor, width: int, groups: int) -> torch.Tensor:
    """``(E, g*k)``: for each expert's kept neurons ``keep`` ``(E, k)``, the entries of its ``g`` neuron groups."""
    return torch.cat([keep + g * width for g in range(groups)], dim=1)


def _gather_experts(t: torch.Tensor, dim: int, keep: torch.Tensor, width: int) -> torch.Tensor:
    """``t``'s kept entries along ``dim`` (1 or 2), expert by expert: a new contiguous tensor."""
    index = _expert_index(keep.to(t.device), width, t.shape[dim] // width)  # (E, g*k)
    if t.dim() == 3:
        index = index.unsqueeze(-1) if dim == 1 else index.unsqueeze(1)
    return torch.take_along_dim(t, index, dim=dim).contiguous()


def slice_experts_ref(
    rows: Sequence[torch.Tensor], cols: Sequence[torch.Tensor], keep: torch.Tensor, width: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Reference of :func:`slice_experts_`, out of place: new contiguous tensors, inputs untouched.

    Args:
        rows: ``(E, g*n, d)`` in-projections or ``(E, g*n)`` biases (neurons on dim 1).
        cols: ``(E, d, g*n)`` out-projections (neurons on dim 2).
        keep: ``(E, k)``: row ``e`` is expert ``e``'s kept neurons, sorted, unique, in ``[0, n)``.

    Returns:
        ``(rows', cols')``: ``(E, g*k, d)`` / ``(E, g*k)`` and ``(E, d, g*k)``.
    """

    return [_gather_experts(t, 1, keep, width) for t in rows], [_gather_experts(t, 2, keep, width) for t in cols]


@torch.no_grad()
def slice_experts_(
    rows: Sequence[torch.Tensor],
    cols: Sequence[torch.Tensor],
    keep: torch.Tensor,
    width: int,
    *,
    backend: str = "auto",
    scratch_bytes: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keep only neurons ``keep[e]`` of every expert ``e`` of fused expert tensors, in place.

    Args:
        rows, cols, keep: as :func:`slice_experts_ref`.
        backend: ``"native"``: ``torch.ops.prunenet.slice_experts_`` (each expert compacted like one FFN,
            then moved down into the packed tensor; bounded extra memory); ``"torch"``: each tensor
            replaced in turn by its gathered copy; ``"auto"``: native when the extension is built and takes
            these inputs (contiguous, one float dtype).
        scratch_bytes: the native op's scratch size (default 4 MiB).

    Returns:
        ``(rows, cols)``, the same tensors, now ``(E, g*k, ...)`` / ``(E, d, g*k)``.
    """
    rows, cols = list(rows), list(cols)
    if _ran_native("slice_experts_", ops.native_experts_ok, rows, cols, keep, width, backend, scratch_bytes):
        return rows, cols
    if keep.dim() != 2:
        raise ValueError(f"keep must be (experts, k), got shape {tuple(keep.shape)}")
    validate_keeps(list(keep), keep.shape[0], width)
    tensors = [(t, 1) for t in rows] + [(t, 2) for t in cols]
    for t, dim in tensors:
        if t.dim() not in ((2, 3) if dim == 1 else (3,)) or t.shape[0] != keep.shape[0] or t.shape[dim] % width:
            raise ValueError(
                f"shape {tuple(t.shape)}: expected {keep.shape[0]} experts and a multiple of width {width} on dim {dim}"
            )
    for t, dim in tensors:
        t.set_(_gather_experts(t, dim, keep, width))  # one at a time: the old storage goes before the next copy
    return rows, cols


def validate_keeps(keeps: Sequence[torch.Tensor], units: int, width: int, *, what: str = "FFN neurons",
                   per: str = "FFN units (layers, or every layer's experts)") -> int:  # fmt: skip
    """Check kept-index vectors: ``units`` of them (one per ``per``), 1-D int64 of one length ``k >= 1``, each
    sorted, unique and in ``[0, width)``; return ``k``. ``what`` names the entries in the messages (the FFN's
    neurons, or attention's KV groups)."""
    if len(keeps) != units:
        raise ValueError(f"got kept {what} for {len(keeps)} {per}, the model has {units}")
    k = keeps[0].numel()
    for layer, keep in enumerate(keeps):
        if keep.dtype != torch.int64 or keep.dim() != 1 or keep.numel() != k:
            raise ValueError(f"layer {layer}: kept {what} must be a 1-D int64 tensor of length {k}")
        if k and (keep[0] < 0 or keep[-1] >= width or not bool((keep[1:] > keep[:-1]).all())):
            raise ValueError(f"layer {layer}: kept {what} must be sorted, unique and in [0, {width})")
    if k == 0:
        raise ValueError(f"cannot keep zero {what}")
    return k


@torch.no_grad()
def slice_model_(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    keeps: Sequence[torch.Tensor],
    progress: bool = True,
    backend: str = "auto",
) -> None:
    """Keep only neurons ``keeps[i]`` in the FFN of every block ``i`` of ``model``, in place.

    Args:
        model: a ``*ForCausalLM`` model served by ``adapter``.
        keeps: one sorted ``(k,)`` int64 vector per FFN unit (same ``k`` everywhere): per layer, or per
            expert of every layer (``adapter.num_units``, expert ``e`` of layer ``l`` at ``l * E + e``).
        backend: see :func:`slice_ffn_`.
    """
    config = model.config
    width = adapter.ffn_width(config)
    k = validate_keeps(keeps, adapter.num_units(config), width)
    experts = adapter.num_experts(config)
    layers = range(adapter.num_layers(config))
    for layer in progress_bar(layers, desc="slicing layers", unit="layer", enabled=progress):
        found = adapter.neuron_parameters(model, layer)
        for spec, param in found:
            axis = spec.stored_axis
            if param.shape[axis] != spec.groups * width:
                raise ValueError(
                    f"layer {layer} {spec.name}: expected {spec.groups * width} entries on axis {axis} "
                    f"(FFN width {width}), got shape {tuple(param.shape)}"
                )
        rows = [param for spec, param in found if spec.axis == 0]
        cols = [param for spec, param in found if spec.axis == 1]
        device = (rows or cols)[0].device
        if adapter.experts_attr is None:
            slice_ffn_(rows, cols, keeps[layer].to(device), width, backend=backend)
        else:  # (E, k): the kept neurons of each of the block's experts
            keep = torch.stack(list(keeps[layer * experts : (layer + 1) * experts])).to(device)
            slice_experts_(rows, cols, keep, width, backend=backend)
        adapter.record_sliced_shapes(model, layer, k)
    adapter.set_ffn_width(config, k)


@torch.no_grad()
def slice_linear_(linear: torch.nn.Linear, index: torch.Tensor, dim: int, backend: str = "auto") -> None:
    """Keep entries ``index`` (sorted, unique int64) of ``linear`` along ``dim``, in place, through :func:`slice_ffn_`.

    ``dim`` 0 keeps output features (rows of ``weight`` ``(out, in)``, and the bias); 1 keeps input
    features (columns). Each entry is a "neuron" of a one-group axis, so this is the same in-place op
    the FFN goes through; ``in_features``/``out_features`` follow the new shape.
    """
    weight = linear.weight
    index = index.to(weight.device)
    if dim == 0:
        rows = [weight] + ([linear.bias] if linear.bias is not None else [])
        slice_ffn_(rows, [], index, weight.shape[0], backend=backend)
    else:
        slice_ffn_([], [weight], index, weight.shape[1], backend=backend)
    linear.out_features, linear.in_features = weight.shape
