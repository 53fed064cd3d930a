"""Probe text without a dataset: token ids the model generates itself, from its BOS token.

Self-calibration (:mod:`prunenet.selfcal`) runs the model forward on them; self-distillation
(:mod:`prunenet.distill`) trains the pruned model on them. Uniformly random ids (``kind="random"``) are a
research variant the selection study measured (``benchmarks/selection_study.py``, ``selfcal-wanda-rand``);
the shipped methods use generated probes.

Shapes: ``B`` sequences of ``T`` tokens.
"""

from __future__ import annotations

import torch

from .adapters import get_adapter
from .compat import forward_with_cache
from .config import PruneConfig
from .progress import progress_bar
from .validate import check_finite

PROBES = ("generate", "random")
"""Probe kinds of :func:`self_probes`: ``"generate"`` (shipped) and ``"random"`` (a research variant)."""


def start_token(model: torch.nn.Module) -> int:
    """The token generation starts from: the (language model's) config's BOS, else EOS (a document
    boundary), else 0."""
    config = get_adapter(model.config).text_config(model.config)
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(config, attr, None)
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


@torch.no_grad()
def self_probes(
    model: torch.nn.Module,
    *,
    kind: str = "generate",
    sequences: int = PruneConfig.probe_sequences,
    length: int = PruneConfig.probe_length,
    seed: int = 0,
    temperature: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Probe token ids ``(sequences, length)`` int64 produced without any dataset (``length`` capped at the
    model's maximum positions).

    ``"generate"``: ancestral sampling from the model itself, starting at :func:`start_token`, with a
    seeded ``torch.Generator`` (deterministic on a given machine; the global RNG is not touched).
    Sampling at temperature 1 rather than greedy decoding: greedy text from a small base model loops on
    one phrase, which would excite only the few neurons of that phrase.
    ``"random"`` (research variant): uniformly random ids (the cheapest probe; off the model's input
    distribution).
    ``progress``: a progress bar over the decoding steps.
    """
    if kind not in PROBES:
        raise ValueError(f"unknown probe kind {kind!r}; choose one of {', '.join(PROBES)}")
    device = model.get_input_embeddings().weight.device  # where the ids go (offloaded blocks are elsewhere)
    generator = torch.Generator().manual_seed(seed)
    length = get_adapter(model.config).capped_length(model.config, length)
    vocab = model.get_output_embeddings().weight.shape[0]
    if kind == "random":
        return torch.randint(vocab, (sequences, length), generator=generator).to(device)
    prefix = torch.full((sequences, 1), start_token(model), dtype=torch.long, device=device)
    return sample(model, prefix, length, generator, temperature=temperature, progress=progress)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prefix: torch.Tensor,
    length: int,
    generator: torch.Generator,
    *,
    temperature: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Continue ``prefix`` ``(B, t)`` by ancestral sampling (KV cache, ``generator`` on the CPU) to ``(B, length)``."""
    was_training = model.training
    model.eval()
    ids, cache, step_ids = prefix, None, prefix
    for _ in progress_bar(range(length - prefix.shape[1]), desc="generating", unit="token", enabled=progress):
        logits, cache = forward_with_cache(model, step_ids, cache)
        probs = torch.softmax(logits[:, -1].float().cpu() / temperature, dim=-1)
        check_finite(probs, "the model's next-token probabilities on its own text")
        step_ids = torch.multinomial(probs, 1, generator=generator).to(prefix.device)
        ids = torch.cat([ids, step_ids], dim=1)
    model.train(was_training)
    return ids
