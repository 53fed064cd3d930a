"""The torch dtype of each ``--dtype`` name: :data:`TORCH_DTYPES`, keyed by ``config.DTYPES``."""

from __future__ import annotations

import torch

from .config import DTYPES

_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Built from config's names (config imports no torch), so the two cannot disagree: a name added there
# without a torch dtype here fails on import, and a dtype here without a name there is never offered.
TORCH_DTYPES: dict[str, torch.dtype] = {name: _TORCH[name] for name in DTYPES}
"""The ``--dtype`` names of the torch dtypes a model is loaded in, in ``config.DTYPES``' order."""
