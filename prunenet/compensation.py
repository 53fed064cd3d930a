"""Error compensation: refit the kept out-projection columns of every FFN unit so that its output on the probe
tokens is preserved once the other neurons are gone.

For one unit (a block's FFN, or one expert) with out-projection ``W`` ``(d, n)``, activations ``h_t`` ``(n,)``
over the probe tokens ``t``, kept neurons ``K`` (``k`` of them) and dropped ones ``R``, the new columns are

    ``X = argmin_X  sum_t ||W h_t - X h_t[K]||^2 + lam ||X - W_K||^2  =  W_K + W_R H_RK (H_KK + lam I)^-1``

with ``H = sum_t h_t h_t^T`` ``(n, n)`` and ``lam = damping * mean(diag H_KK)``: the least-squares (OBS) update of
SlimGPT, ZipLM and OSSCAR, damped towards the dense columns. Only the out-projection's kept columns change, so the
pruned model has stock shapes (no new bias) and reloads with stock ``transformers``. An expert's ``h`` are its
routed tokens' activations scaled by their routing weights (what it adds to the block's output); an expert no
probe token reached keeps its columns.

Every ``H`` is taken on the dense model ("independent" compensation): the pass that chose the neurons sees the
same inputs, so nothing is run block by block. Refitting each block on the outputs of the blocks already pruned and
compensated (SlimGPT's sequential order) is not implemented (docs/methods.md, "Error compensation"). ``H`` is
``n x n`` per unit (:data:`GRAM_DTYPE`), too much to hold for every layer of a large model at once:
:func:`compensate` takes the layers in groups, one forward pass per group, each stopping after the group's last
block.

Shapes: ``d`` hidden size, ``n`` FFN width, ``k`` kept neurons, ``E`` experts per block (1 for a dense FFN).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from .activations import dense_activations, resident_weight, routed_activations, run_with_hooks
from .adapters import ModelAdapter, get_adapter
from .progress import progress_bar
from .validate import check_finite

GRAM_DTYPE = torch.float32
"""The dtype ``H`` is accumulated and the update solved in. Float32 halves the memory of float64 (a LLaMA-7B ``H``:
0.45 GiB) and measured the same: on SmolLM2-135M at ratios 0.2 and 0.3 and dampenings 0.01-1, the refitted columns
within 6e-6 relative of float64's with 8192 tokens and 3e-5 with 1024 (H_KK then rank-deficient), and held-out
perplexity equal to 0.001 (``benchmarks/results/compensation_precision.csv``)."""


def compensated_columns(gram: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, damping: float) -> torch.Tensor:
    """The refitted kept columns ``(d, k)`` of the out-projection ``weight`` ``(d, n)``, in its dtype.

    Args:
        gram: ``(n, n)`` ``H = sum_t h_t h_t^T`` over the probe tokens, float32 or float64: the solve runs in its
            dtype, on its device (``weight`` may be anywhere, in any float dtype).
        keep: ``(k,)`` sorted indices of the kept neurons.
        damping: ``lam / mean(diag H_KK)``, > 0. Larger stays closer to the dense columns.

    An all-zero ``H`` (no token reached the unit) leaves the columns as they are. Memory: at most
    ``max(2 k^2, k^2 + (n - k)(d + k) + d k, k^2 + 3 d k)`` elements of ``gram``'s dtype beside ``gram`` and
    ``weight`` (:func:`solve_bytes`): no full-width copy of either is made.

    Raises:
        ValueError: ``H_KK + lam I`` is not positive definite (a ``damping`` too small for an ``H_KK`` of low
            rank: fewer probe tokens than kept neurons, or neurons that never fire).
    """
    device, dtype = gram.device, gram.dtype
    keep = keep.to(device)
    dropped = torch.ones(gram.shape[0], dtype=torch.bool, device=device)
    dropped[keep] = False
    dropped = dropped.nonzero().squeeze(1)  # (n - k,)
    # Rows and columns in one indexing: gram[keep][:, keep] would first copy k whole rows, (k, n).
    h_kk = gram[keep[:, None], keep]
    scale = h_kk.diagonal().mean()
    if not scale > 0:
        return weight[:, keep.to(weight.device)].clone()
    h_kk.diagonal().add_(damping * scale)
    # cholesky_ex reports a failed factorisation instead of raising torch's LinAlgError (a RuntimeError, which
    # the command line would show as a traceback): a damping too small for a rank-deficient H_KK is the user's
    # setting, not a bug.
    factor, info = torch.linalg.cholesky_ex(h_kk)
    del h_kk
    if info.item() != 0:
        raise ValueError(_too_small(damping))
    w_dropped = weight[:, dropped.to(weight.device)].to(device=device, dtype=dtype)  # W_R (d, n - k)
    cross = w_dropped @ gram[dropped[:, None], keep]  # W_R H_RK, (d, k)
    del w_dropped
    update = torch.cholesky_solve(cross.t(), factor)  # (H_KK + lam I)^-1 H_KR W_R^T, (k, d): H_KK is symmetric
    del cross, factor
    columns = weight[:, keep.to(weight.device)].to(device=device, dtype=dtype).add_(update.t())
    columns = columns.to(device=weight.device, dtype=weight.dtype)
    # Checked in the weight's dtype: a factorisation that passed on pivots at the rounding level, or an update
    # beyond float16's range, would otherwise be written as infinities.
    if not torch.isfinite(columns).all():
        raise ValueError(_too_small(damping))
    return columns


def _too_small(damping: float) -> str:
    return (
        f"--damping {damping} is too small for the activations on the probe tokens: H_KK + damping * mean(diag "
        "H_KK) * I is singular (fewer probe tokens than kept neurons, or neurons that never fire); "
        "raise --damping, add probe tokens (--probe-sequences, --probe-length), or pass --no-compensate"
    )


class ColumnStore:
    """The compensated columns of every unit, ``(d, k)`` in the out-projection's dtype on the CPU: in memory,
    or with ``spill`` in a private temporary folder (``prunenet-compensation-*``, removed by :meth:`close`), so a
    streamed run holds one unit's at a time. :attr:`digest` identifies what was put (a resumed write checks it).
    """

    def __init__(self, spill: bool = False):
        self._memory: dict[int, torch.Tensor] = {}
        self._folder = Path(tempfile.mkdtemp(prefix="prunenet-compensation-")) if spill else None
        self._hashes: dict[int, bytes] = {}

    def put(self, unit: int, columns: torch.Tensor) -> None:
        columns = columns.detach().cpu().contiguous()
        self._hashes[unit] = hashlib.sha256(columns.view(torch.uint8).numpy().tobytes()).digest()
        if self._folder is None:
            self._memory[unit] = columns
        else:
            from safetensors.torch import save_file

            save_file({"columns": columns}, self._folder / f"{unit}.safetensors")

    def get(self, unit: int) -> torch.Tensor:
        """Unit ``unit``'s columns ``(d, k)``. Raises ``KeyError`` for a unit never put."""
        if unit not in self._hashes:
            raise KeyError(unit)
        if self._folder is None:
            return self._memory[unit]
        from safetensors.torch import load_file

        return load_file(self._folder / f"{unit}.safetensors")["columns"]

    def __contains__(self, unit: int) -> bool:
        return unit in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for unit in sorted(self._hashes):
            h.update(f"{unit}:".encode() + self._hashes[unit])
        return h.hexdigest()[:16]

    def close(self) -> None:
        self._memory.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def layer_bytes(adapter: ModelAdapter, config, itemsize: int) -> int:
    """Bytes one layer's compensation holds while its pass runs: every unit's ``H`` (``n x n`` in
    :data:`GRAM_DTYPE`) and a copy of its out-projection (``d x n``, ``itemsize`` bytes per element as stored)."""
    n, d, units = adapter.ffn_width(config), adapter.hidden_size(config), adapter.num_experts(config)
    return units * (n * n * GRAM_DTYPE.itemsize + d * n * itemsize)


def solve_bytes(adapter: ModelAdapter, config, k: int) -> int:
    """Bytes of one unit's solve (:func:`compensated_columns`) at its peak beside ``H`` and the weight, in
    :data:`GRAM_DTYPE`: ``H_KK`` and its Cholesky factor; or the factor, ``W_R`` ``(d, n - k)``, ``H_RK`` and
    their product ``(d, k)``; or the factor, the product, its transposed copy and the solve (three ``(d, k)``)."""
    n, d = adapter.ffn_width(config), adapter.hidden_size(config)
    return max(2 * k * k, k * k + (n - k) * (d + k) + d * k, k * k + 3 * d * k) * GRAM_DTYPE.itemsize


def _matrix(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """An out-projection stored with its neurons on ``axis`` as the ``(d, n)`` matrix it multiplies ``h`` by."""
    return weight if axis == 1 else weight.t()


class _Grams:
    """One pass's accumulators: ``H`` ``(n, n)`` in :data:`GRAM_DTYPE` and the out-projection ``(d, n)`` of each
    unit of the hooked layers, on the device the activations come from."""

    def __init__(self, adapter: ModelAdapter, config):
        self.adapter, self.experts = adapter, adapter.num_experts(config)
        self.grams: dict[int, torch.Tensor] = {}
        self.weights: dict[int, torch.Tensor] = {}

    def add(self, unit: int, h: torch.Tensor) -> None:
        h = h.to(GRAM_DTYPE)
        if unit not in self.grams:
            self.grams[unit] = torch.zeros(h.shape[1], h.shape[1], dtype=GRAM_DTYPE, device=h.device)
        self.grams[unit].addmm_(h.t(), h)

    def dense_hook(self, layer: int):
        axis = self.adapter.out_projection.axis

        def hook(module, args):
            h = dense_activations(args)
            if layer not in self.weights:
                self.weights[layer] = _matrix(resident_weight(module), axis).to(h.device, copy=True)
            self.add(layer, h)

        return hook

    def expert_hook(self, layer: int):
        spec = self.adapter.out_projection
        out_name = spec.name.rpartition(".")[2]

        def hook(module, args):
            weight = functools.cache(functools.partial(resident_weight, module))
            first = layer * self.experts
            if first not in self.weights:
                device = args[0].device
                for e, w in enumerate(weight(out_name)):
                    self.weights[first + e] = _matrix(w, spec.axis).to(device, copy=True)
            for e, h in routed_activations(module, args, self.adapter, weight):
                self.add(first + e, h)

        return hook


def layer_groups(num_layers: int, per_pass: int | None) -> list[range]:
    """The layers in order, ``per_pass`` at a time (all at once for ``None``)."""
    per_pass = num_layers if per_pass is None else max(1, per_pass)
    return [range(start, min(start + per_pass, num_layers)) for start in range(0, num_layers, per_pass)]


@torch.no_grad()
def compensate(
    model: torch.nn.Module,
    ids: torch.Tensor,
    keeps: Sequence[torch.Tensor],
    damping: float,
    store: ColumnStore,
    *,
    layers_per_pass: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> ColumnStore:
    """Put every unit's compensated columns (:func:`compensated_columns`) into ``store``; ``model`` is unchanged.

    Args:
        model: the dense model (in memory, or its blocks offloaded: :mod:`prunenet.offload`).
        ids: ``(B, T)`` the probe token ids the neurons were chosen on.
        keeps: per unit, sorted ``(k,)`` kept neurons.
        layers_per_pass: how many layers' ``H`` one forward pass accumulates (default: all); the memory plan's.
    """
    adapter = get_adapter(model.config)
    groups = layer_groups(adapter.num_layers(model.config), layers_per_pass)
    with progress_bar(total=len(keeps), desc="compensating", unit="FFN", enabled=progress) as bar:
        for layers in groups:
            grams = _Grams(adapter, model.config)
            hook = grams.dense_hook if adapter.experts_attr is None else grams.expert_hook
            run_with_hooks(model, adapter, ids, {i: hook(i) for i in layers}, batch_size)
            units = range(layers.start * grams.experts, layers.stop * grams.experts)
            for unit in units:
                weight = grams.weights.pop(unit)
                gram = grams.grams.pop(unit, None)
                if gram is None:  # an expert no probe token was routed to
                    store.put(unit, weight[:, keeps[unit].to(weight.device)])
                    continue
                check_finite(gram, "the FFN activations on the probes")
                try:
                    store.put(unit, compensated_columns(gram, weight, keeps[unit], damping))
                except ValueError as err:
                    raise ValueError(f"compensating {_unit_name(unit, grams.experts)}: {err}") from None
                del gram
            bar.update(len(units))
    return store


def _unit_name(unit: int, experts: int) -> str:
    layer, expert = divmod(unit, experts)
    return f"layer {layer}" + (f" expert {expert}" if experts > 1 else "")


def write_columns_(model: torch.nn.Module, store: ColumnStore) -> None:
    """Copy every unit's columns from ``store`` into the sliced model's out-projections, in place."""
    adapter = get_adapter(model.config)
    spec, experts = adapter.out_projection, adapter.num_experts(model.config)
    for unit in range(adapter.num_units(model.config)):
        layer, expert = divmod(unit, experts)
        param = model.get_parameter(adapter.block_prefix(layer) + spec.name)
        replace_columns_(param.data[expert] if spec.experts else param.data, store.get(unit), spec.axis)


def replace_columns_(tensor: torch.Tensor, columns: torch.Tensor, axis: int) -> None:
    """Overwrite one unit's sliced out-projection ``tensor`` (neurons on ``axis``) with ``columns`` ``(d, k)``."""
    _matrix(tensor, axis).copy_(columns)
