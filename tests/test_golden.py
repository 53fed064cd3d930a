"""Every method on every path writes what it wrote when the golden records were made (``tests/golden.py``):
the same kept neurons, parameter counts, tensors, config and manifest. Run with and without the native
extension, this also shows that both slicing paths write the same bytes."""

from __future__ import annotations

import json

import golden
import pytest


def compare(recorded: dict, produced: dict) -> None:
    mismatched = []
    for case, record in recorded["cases"].items():
        same = golden.same_machine(recorded, produced, case.split("/")[0])
        if golden.comparable(case, record, same) != golden.comparable(case, produced["cases"][case], same):
            mismatched.append(case)
    assert not mismatched, f"outputs differ from the golden records: {mismatched}"
    assert produced["cases"].keys() == recorded["cases"].keys()


def test_tiny_models_write_the_golden_outputs(tmp_path):
    recorded = json.loads(golden.TINY_FILE.read_text())
    compare(recorded, golden.run_tiny(tmp_path))


@pytest.mark.slow
def test_the_embedded_model_writes_the_golden_outputs(tmp_path):
    recorded = json.loads(golden.EMBEDDED_FILE.read_text())
    compare(recorded, golden.run_embedded(tmp_path))
