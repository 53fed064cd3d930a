"""Shared fixtures: deterministic seeds, offline hub, tiny random-initialised models of every family."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU the Triton kernels (tests/test_kernels.py) run in Triton's interpreter, on CPU
# tensors. Triton reads this when it is first imported, so it is set here, before any test module
# is collected; it only makes an explicit `--reward-backend triton` usable on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny random llama saved with the tiny tokenizer: the model folder most CLI and pipeline tests prune."""
    from tiny_models import save_tiny_model

    folder = tmp_path / "tiny-llama"
    save_tiny_model("llama", folder)
    return folder


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread. For tiny models: on a loaded 2-core machine OpenMP's second thread
    made a 6-step LoRA run of the tiny llama take 40 s instead of 2.8 s (measured), waiting on a
    descheduled worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
