"""What self-calibration and its research variants read through the adapter, on every family: each FFN unit's
neuron-row matrices; and the probe budget's defaults, which are PruneConfig's."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from tiny_models import CONFIGS, tiny_model

from prunenet.adapters import get_adapter
from prunenet.config import PruneConfig
from prunenet.probes import self_probes
from prunenet.selectors import random_keeps
from prunenet.selfcal import selfcal_keeps
from prunenet.slicing import slice_model_


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_neuron_matrices_hold_each_units_neuron_rows_and_follow_its_slicing(family):
    """One (n, d) matrix per in-projection group and one for the out-projection, the state matrix first; after
    slicing to kept neurons ``keep``, each is the dense one's rows ``keep`` (every row is one neuron's)."""
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    n, d, units = adapter.ffn_width(model.config), adapter.hidden_size(model.config), adapter.num_units(model.config)
    groups = sum(spec.groups for spec in adapter.tensors if not spec.name.endswith("bias"))
    dense = [[m.clone() for m in adapter.neuron_matrices(model, unit)] for unit in range(units)]
    for unit, matrices in enumerate(dense):
        assert len(matrices) == groups and all(m.shape == (n, d) for m in matrices)
        assert torch.equal(matrices[0], adapter.layer_state(model, unit))
    keeps = random_keeps(units, n, adapter.kept_width(0.5, n), seed=1)
    slice_model_(model, adapter, keeps, progress=False)
    for unit, keep in enumerate(keeps):
        sliced = adapter.neuron_matrices(model, unit)
        assert all(torch.equal(a, b[keep]) for a, b in zip(sliced, dense[unit], strict=True))


def test_the_probe_budget_defaults_are_prune_configs():
    config = {field.name: field.default for field in dataclasses.fields(PruneConfig)}
    for function in (selfcal_keeps, self_probes):
        params = inspect.signature(function).parameters
        assert params["sequences"].default == config["probe_sequences"]
        assert params["length"].default == config["probe_length"]
