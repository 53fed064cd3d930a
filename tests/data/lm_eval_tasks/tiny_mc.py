"""Dataset loader of the tiny local lm-eval task ``prunenet_tiny_mc`` (plumbing test data, not a benchmark)."""

from pathlib import Path

import datasets


def load(**kwargs) -> datasets.DatasetDict:
    """The rows of ``tiny_mc.jsonl`` (next to this file) as the ``test`` split; ``kwargs`` (task metadata) unused."""
    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("tiny_mc.jsonl"))})
