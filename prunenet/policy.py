"""The PruneNet policy (the paper's ``SparsityPredictor``) and row selection.

The policy scores the ``n`` rows (FFN neurons) of a state matrix ``W`` ``(n, d)``:

    alpha = sigmoid((W P^T + 1 b^T) v)        P: (n, d), b: (n,), v: (n, 1)

Computed literally that is an ``(n, n)`` intermediate and O(n^2 d) work. Because
``(W P^T + 1 b^T) v = W (P^T v) + (b . v)``, the same logits cost one matrix-vector product,
O(n d): we always use that form and test it against the literal one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SELECTIONS


class SparsityPredictor(nn.Module):
    """Row keep-probabilities for an ``(n, d)`` state matrix.

    Args:
        hidden_size: ``d``, columns of the state matrix.
        ffn_width: ``n``, rows of the state matrix.
    """

    def __init__(self, hidden_size: int, ffn_width: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, ffn_width)  # P: (n, d), b: (n,)
        self.row_weights = nn.Parameter(torch.rand(ffn_width, 1))  # v: (n, 1)

    @property
    def shape(self) -> tuple[int, int]:
        """``(d, n)``: the state-matrix shape ``(n, d)`` this policy accepts, as (hidden, FFN width)."""
        return self.proj.in_features, self.proj.out_features

    def direction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P^T v, b . v)``: a ``(d,)`` vector and a scalar with ``logits(W) = W @ u + c``."""
        v = self.row_weights.squeeze(-1)
        return self.proj.weight.t() @ v, self.proj.bias @ v

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """Keep logits ``(..., n)`` for state matrices ``(..., n, d)``, in O(n d) per matrix."""
        u, c = self.direction()
        return state.to(u.dtype) @ u + c

    def logits_literal(self, state: torch.Tensor) -> torch.Tensor:
        """The paper's O(n^2 d) form ``(W P^T + b) v``; only for testing :meth:`logits`."""
        return (self.proj(state.to(self.row_weights.dtype)) @ self.row_weights).squeeze(-1)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """Keep probabilities ``alpha`` ``(..., n)``."""
        return torch.sigmoid(self.logits(state))


def check_policy_shape(policy: SparsityPredictor, hidden_size: int, ffn_width: int) -> None:
    """Raise ``ValueError`` stating both shapes when ``policy`` cannot score ``(ffn_width, hidden_size)`` states."""
    d, n = policy.shape
    if (d, n) != (hidden_size, ffn_width):
        raise ValueError(
            f"policy shape mismatch: the policy was trained for state matrices of shape (n={n}, d={d}) "
            f"(FFN width x hidden size), but this model's are (n={ffn_width}, d={hidden_size}); "
            "a policy can be reused only on models with the same (d, n)"
        )


def log_scores(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Log of the relaxed-Bernoulli scores ``sigmoid(logit(u) + logit(alpha))``, ``u ~ U(0, 1)``.

    ``logit(alpha)`` is the policy logit itself, so no probability is ever rounded to 0 or 1;
    and we return ``logsigmoid(.)`` rather than the score so that tiny scores stay distinct.

    Args:
        logits: ``(n,)`` keep logits.
    Returns:
        ``(n,)`` float32 log-scores.
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    u = u.clamp_(1e-7, 1 - 1e-7)
    return F.logsigmoid(torch.logit(u) + logits.float())


def sample_without_replacement(log_weights: torch.Tensor, k: int, generator: torch.Generator | None = None):
    """Draw ``k`` distinct indices with probability proportional to ``exp(log_weights)``, sequentially.

    Same distribution as ``torch.multinomial(exp(log_weights), k, replacement=False)`` (Gumbel-top-k,
    Kool et al. 2019), but it works in log space, so it never fails on weights that underflow to 0.

    Returns:
        ``(k,)`` int64 indices, sorted ascending.
    """
    u = torch.rand(log_weights.shape, generator=generator, device=log_weights.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(u.clamp_(1e-10, 1 - 1e-7)))
    return torch.topk(log_weights.float() + gumbel, k).indices.sort().values


def select_rows(logits: torch.Tensor, k: int, selection: str = "sample", generator: torch.Generator | None = None):
    """Choose the ``k`` rows to keep from keep logits ``(n,)``; returns sorted ``(k,)`` int64.

    ``"sample"`` is the paper's rule: relaxed-Bernoulli scores, then ``k`` rows drawn without
    replacement in proportion to them. ``"topk"`` keeps the ``k`` most probable rows.
    """
    if selection == "topk":
        return torch.topk(logits.float(), k).indices.sort().values
    if selection == "sample":
        return sample_without_replacement(log_scores(logits, generator), k, generator)
    raise ValueError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")


def skip_selection(n: int, selection: str, generator: torch.Generator | None, device=None) -> None:
    """Advance ``generator`` exactly as ``select_rows(logits, k, selection, generator)`` would for ``(n,)`` logits.

    Distributed training (:mod:`prunenet.distributed`) draws every layer's random numbers on every
    rank but selects only its own layers; this keeps the other layers' draws in step. Tested against
    :func:`select_rows` (the generator states must match afterwards).
    """
    if selection == "sample":
        for _ in range(2):  # log_scores' u, then sample_without_replacement's Gumbel u
            torch.rand((n,), generator=generator, device=device, dtype=torch.float32)
    elif selection != "topk":
        raise ValueError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")


def kept_log_prob(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``sum_j log alpha_j`` over kept rows, as ``logsigmoid``: finite for any logit (``log(sigmoid)`` is not)."""
    return F.logsigmoid(logits.index_select(-1, keep)).sum()


def kl_to_half(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``KL(Bernoulli(alpha) || Bernoulli(0.5))``, computed from logits without ``log(0)``."""
    log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    return (p * log_p + (1 - p) * log_q).mean() + torch.log(torch.tensor(2.0, device=logits.device))
