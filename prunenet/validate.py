"""Checks of user-supplied values, shared by the commands and the Python API.

Each check raises ``ValueError`` with one line naming the CLI flag, the value and what is allowed, so
the command line can print it as is (exit code 2) and an API caller gets the same message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MAX_COUNT = 2**31 - 1
"""Largest value of a count flag (episodes, steps, tokens, ...): every count fits a C ``int`` downstream
(tqdm, torch), and even one episode or step per microsecond would take 35 minutes to get there."""

MAX_SEED = 2**32 - 1
"""Seeds are in ``[0, 2**32)``: what NumPy (lm-eval seeds it) accepts; torch would take more."""


def check_count(flag: str, value, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``; ``ValueError`` naming ``flag`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{flag} must be a whole number, got {value!r}")
    if not minimum <= value <= maximum:
        bound = f"at least {minimum}" if value < minimum else f"at most {maximum}"
        raise ValueError(f"{flag} must be {bound}, got {value}")
    return value


def check_seed(value, flag: str = "--seed") -> int:
    """A seed in ``[0, MAX_SEED]``."""
    return check_count(flag, value, minimum=0, maximum=MAX_SEED)


def check_number(flag: str, value, *, minimum: float | None = None, positive: bool = False) -> float:
    """A finite ``float``; ``>= minimum`` when given; ``> 0`` with ``positive``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{flag} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{flag} must be positive, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{flag} must be at least {minimum}, got {value}")
    return float(value)


def parse_size(text: str | int | float) -> int:
    """Bytes from ``"4GiB"``, ``"512MiB"``, ``"3.5GB"``, ``"2e9"`` or a number (``--max-memory``).

    Binary (KiB, MiB, GiB, TiB) and decimal (KB, MB, GB, TB) units; case-insensitive; ``B`` optional.
    """
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?)?b?\s*", str(text), flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"--max-memory: cannot read {text!r} as a size; write e.g. 4GiB, 512MiB or 3GB")
        unit = (match.group(2) or "").lower()
        power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[:1]]
        value = float(match.group(1)) * ((1024 if unit.endswith("i") else 1000) ** power)
    if not math.isfinite(value):
        raise ValueError(f"--max-memory {text!r} is not a finite size")
    if value <= 0:
        raise ValueError(f"--max-memory must be positive, got {text!r}")
    return int(value)


def resolve_device(device: str) -> str:
    """``device``, with ``"auto"`` made concrete: ``"cuda"`` when a GPU is usable, else ``"cpu"``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | torch.device) -> torch.device:
    """The torch device ``device`` names, if this process can use it.

    Raises:
        ValueError: not a device name (``--device bogus``), a CUDA device on a torch build without CUDA
            or a machine without a GPU, a GPU index that does not exist, or any device torch cannot
            allocate on.
    """
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(
                f"--device {device}: this torch ({torch.__version__}) is a CPU-only build; use --device cpu, "
                "or install a CUDA build of torch"
            )
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: no CUDA GPU is visible to this process; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return parsed
    try:  # mps, xpu, ...: whether torch can allocate there says whether it is usable
        torch.empty(1, device=parsed)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"--device {device} is not usable here: {' '.join(str(err).split())}") from None
    return parsed


DAMAGED_WEIGHTS = "the checkpoint is damaged, or was saved from a diverged training run"


def count_nonfinite(tensor: torch.Tensor) -> int:
    """How many entries of ``tensor`` are NaN or infinite (0 for a tensor that is not floating point)."""
    import torch

    # A finite sum means every entry is finite (a NaN or infinity makes the sum NaN or infinite), so one
    # reduction screens the tensor; the elementwise test (20-50x slower) runs only to count the bad entries.
    # The sum is in the tensor's own dtype (torch accumulates 16-bit floats in float32): 8-26 GiB/s on 2 CPU
    # cores where a float64 sum, which converts every entry, ran at 0.4-0.8 GiB/s. A sum that overflows
    # (a 16-bit result above 65504) is a false alarm the elementwise count then clears.
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum())


def check_finite(tensor: torch.Tensor | Iterable[torch.Tensor], what: str, hint: str = DAMAGED_WEIGHTS) -> None:
    """Raise ``ValueError`` when ``tensor`` holds NaN or infinity: ``"{what} holds N NaN or infinite values; {hint}"``.

    ``tensor`` may also be given in pieces (a tensor streamed from a file chunk by chunk): one message for all.
    Non-finite weights would otherwise surface far away (an eigen-solver that "failed to converge", a
    selection that silently keeps the same neurons in every layer) or not at all (copied into the output).
    """
    import torch

    pieces = [tensor] if isinstance(tensor, torch.Tensor) else tensor
    bad = total = 0
    for piece in pieces:
        bad, total = bad + count_nonfinite(piece), total + piece.numel()
    if bad:
        raise ValueError(f"{what} holds {bad} NaN or infinite value(s) out of {total}; {hint}")


def check_finite_weights(model: torch.nn.Module, where: str | None = None) -> None:
    """The finiteness rule for an instantiated model: :func:`check_finite` on every floating tensor of its state
    dict (parameters and persistent buffers; a tied tensor once), named by its key (``"... in {where}"``).

    One sum per tensor: 0.03 s for the embedded SmolLM2-135M's 513 MiB (float32) on 2 CPU cores.
    """
    seen = set()
    for name, tensor in model.state_dict().items():
        if tensor.numel() and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            check_finite(tensor, name if where is None else f"{name} in {where}")
