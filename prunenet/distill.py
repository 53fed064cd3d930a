"""Self-distillation targets: the dense model writes the training text and says what it predicts on it.

Recovery without a dataset (``prunenet finetune --teacher DENSE``). The dense model the pruned one came
from samples its own text (:func:`~prunenet.probes.self_probes`: from its BOS token, temperature 1, a
seeded generator), then runs forward on it once; for every position the ``K`` most likely next tokens and
their log-probabilities are kept, with the log of the probability mass left outside them. The student
(the pruned model with LoRA adapters) is trained to match that distribution: the KL divergence between
the teacher's and the student's next-token distributions, both coarsened to the ``K`` teacher tokens plus
one "everything else" bucket (:func:`topk_kl`). The coarsened KL never exceeds the full-vocabulary KL and
equals it when the teacher's tail mass is zero. ``K = 0`` uses the full vocabulary: then the teacher stays
resident and runs on every batch (:func:`full_kl`).

The targets are computed once, so the teacher need not be resident while the student trains: the
peak is the larger of the two models plus the targets, ``tokens x K x 8`` bytes (float32 values,
int32 indices) plus ``tokens x 4`` bytes of tail mass.

Shapes: ``N`` sequences of ``L`` tokens, ``V`` vocabulary, ``K`` kept teacher tokens per position.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .probes import self_probes
from .progress import progress_bar
from .validate import check_finite


@dataclass
class TeacherTargets:
    """What the teacher says about its own text, computed once by :func:`teacher_targets`.

    Attributes:
        ids: ``(N, L)`` int64, the generated text.
        logp: ``(N, L, K)`` float32, the teacher's log-probabilities of its ``K`` most likely next tokens at
            every position (``K = 0``: empty; the teacher is run again on each batch).
        index: ``(N, L, K)`` int32, which tokens those are.
        tail: ``(N, L)`` float32, the log of the probability mass outside them.
        seed: the generator's seed. seconds: ``{"generate_s", "targets_s"}``.
    """

    ids: torch.Tensor
    logp: torch.Tensor
    index: torch.Tensor
    tail: torch.Tensor
    seed: int
    seconds: dict

    @property
    def top_k(self) -> int:
        return int(self.logp.shape[-1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ids, self.logp, self.index, self.tail))

    def rows(self, idx: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
        """``(ids, logp, index, tail)`` of the sequences ``idx``, on ``device``."""
        return tuple(t[idx].to(device) for t in (self.ids, self.logp, self.index, self.tail))


@torch.no_grad()
def teacher_targets(
    teacher: torch.nn.Module,
    *,
    sequences: int,
    length: int,
    top_k: int,
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = False,
) -> TeacherTargets:
    """Generate ``sequences x length`` tokens with ``teacher`` and record its top-``top_k`` next-token
    distribution at every position (see :class:`TeacherTargets`). ``length`` is capped at the model's context.
    """
    tick = time.perf_counter()
    ids = self_probes(teacher, sequences=sequences, length=length, seed=seed, progress=progress).cpu()
    seconds = {"generate_s": time.perf_counter() - tick}
    tick = time.perf_counter()
    n, length = ids.shape
    logp = torch.empty(n, length, top_k, dtype=torch.float32)
    index = torch.empty(n, length, top_k, dtype=torch.int32)
    tail = torch.empty(n, length, dtype=torch.float32)
    device = teacher.get_input_embeddings().weight.device
    if top_k:
        for i in progress_bar(range(0, n, batch_size), desc="teacher targets", unit="batch", enabled=progress):
            log_probs = torch.log_softmax(teacher(input_ids=ids[i : i + batch_size].to(device)).logits.float(), -1)
            check_finite(log_probs, "the teacher's next-token probabilities on its own text")
            values, tokens = log_probs.topk(top_k, dim=-1)
            logp[i : i + batch_size], index[i : i + batch_size] = values.cpu(), tokens.int().cpu()
            tail[i : i + batch_size] = _logsumexp_outside(log_probs, tokens).cpu()
    seconds["targets_s"] = time.perf_counter() - tick
    return TeacherTargets(ids, logp, index, tail, seed, seconds)


def _logsumexp_outside(log_probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log`` of the probability mass outside ``index``: ``(...)`` from ``(..., V)`` and ``(..., K)``.

    A sum over the other tokens rather than ``log(1 - sum(top))``, which cancels to ``-inf`` when the top
    tokens hold all but a rounding error of the mass.
    """
    return torch.logsumexp(log_probs.scatter(-1, index.long(), float("-inf")), dim=-1)


def topk_kl(student_logits: torch.Tensor, logp: torch.Tensor, index: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(teacher || student)`` on the ``K + 1`` buckets: the teacher's top ``K``
    tokens and the rest.

    Args:
        student_logits: ``(..., V)`` logits of the student. logp, index: ``(..., K)`` the teacher's
            log-probabilities and their token ids. tail: ``(...)`` the teacher's log tail mass.
    """
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    log_q_top = log_q.gather(-1, index.long())
    log_q_tail = _logsumexp_outside(log_q, index)
    p_top, p_tail = logp.exp(), tail.exp()
    kl = (p_top * (logp - log_q_top)).sum(-1)
    # 0 * log 0 = 0: a position whose tail mass is zero contributes nothing for the tail.
    kl = kl + torch.where(p_tail > 0, p_tail * (tail - log_q_tail), torch.zeros_like(p_tail))
    return kl.mean()


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(teacher || student)`` over the whole vocabulary; logits ``(..., V)``."""
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
