"""REINFORCE training of the PruneNet policy on a model's FFN state matrices.

Training reads only the state matrices (one ``(n, d)`` view per layer): no copy of the model,
no forward pass, no calibration data. One episode samples kept rows for every layer, scores
each layer with the spectral reward, then takes one AdamW step per layer ``i`` on

    loss_i = -gamma^i R_i log p(keep_i)  [+ kl_weight * KL(alpha_i || Bernoulli(0.5))]

where ``log p(keep_i) = sum_{j in keep_i} log alpha_ij``. The policy with the best total
discounted reward (the one that produced that episode, i.e. before its update) is returned.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .config import TrainConfig
from .distributed import Distributed
from .policy import SparsityPredictor, kept_log_prob, kl_to_half, select_rows, skip_selection
from .progress import progress_bar
from .reward import StateSequence, episode_rewards, prepare_reward, state_shape

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """The best policy and the training trace."""

    policy: SparsityPredictor
    best_episode: int
    best_reward: float
    episode_rewards: list[float] = field(default_factory=list)
    seconds: float = 0.0
    prepare_seconds: float = 0.0  # reference spectra and W^T W, once per run
    episode_seconds: list[float] = field(default_factory=list)
    reward_backend: str = ""  # the backend that computed the rewards ("torch" or "triton")


def make_policy(hidden_size: int, ffn_width: int, seed: int, device="cpu") -> SparsityPredictor:
    """A freshly initialised policy, reproducible from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = SparsityPredictor(hidden_size, ffn_width)
    return policy.to(device)


def train_policy(
    states: Sequence[torch.Tensor],
    k: int,
    config: TrainConfig | None = None,
    policy: SparsityPredictor | None = None,
    progress: bool = True,
    spill_grams: bool = False,
    dist: Distributed | None = None,
) -> TrainResult:
    """Train a policy to keep ``k`` rows of each state matrix.

    Args:
        states: ``L`` state matrices ``(n, d)`` (views of the model's first in-projections, or a
            :class:`~prunenet.reward.StateSequence` loading them from a checkpoint on access; they
            are read, never modified, one at a time). All on one device; the policy goes there too.
        k: rows to keep per layer, ``0 < k <= n``.
        config: hyper-parameters; defaults to :class:`TrainConfig`.
        policy: a policy to continue training (fresh one from ``config.seed`` if ``None``).
        progress: show a progress bar over episodes.
        spill_grams: keep the reward's ``W^T W`` matrices in a temporary file rather than memory
            (same result; see :func:`~prunenet.reward.prepare_reward`).
        dist: this process's place in a ``torchrun`` job: it reads and scores only its own layers
            (``dist.owned_layers``) and shares rewards and gradients, with the single-process result
            (see :mod:`prunenet.distributed`). ``None``: a single process.
    """
    config = config or TrainConfig()
    (n, d), device = state_shape(states)
    if not 0 < k <= n:
        raise ValueError(f"k must be in (0, {n}], got {k}")
    policy = policy if policy is not None else make_policy(d, n, config.seed, device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    discount = config.gamma ** torch.arange(len(states), dtype=torch.float64)
    dist = dist or Distributed()
    owned = dist.owned_layers(len(states))  # all layers in a single process
    mine = _layers(states, owned)

    start = time.perf_counter()
    # Reference spectra (and the full Gram matrices where the complement route pays) once per run.
    references = prepare_reward(mine, k, config.reward_backend, spill_grams=spill_grams) if len(owned) else None
    result = TrainResult(
        policy=copy.deepcopy(policy),
        best_episode=-1,
        best_reward=float("-inf"),
        reward_backend=references.backend if references else "",
    )
    result.prepare_seconds = time.perf_counter() - start
    bar = progress_bar(range(config.episodes), desc="policy episodes", unit="ep", enabled=progress)
    for episode in bar:
        episode_start = time.perf_counter()
        keeps: list[torch.Tensor | None] = []
        with torch.no_grad():
            for i in range(len(states)):
                if i in owned:
                    keeps.append(select_rows(policy.logits(states[i]), k, "sample", generator))
                else:  # another rank's layer: draw its random numbers all the same, to stay in step
                    skip_selection(n, "sample", generator, device)
                    keeps.append(None)
        rewards = torch.zeros(len(states), dtype=torch.float64)
        if len(owned):  # this rank's layers in one batched call; the others' arrive as exact sums with 0
            rewards[owned.start : owned.stop] = episode_rewards(mine, keeps[owned.start : owned.stop], references)
        dist.all_reduce_sum(rewards)
        weights = (discount * rewards).float().to(device)
        total = float(weights.sum())
        result.episode_rewards.append(total)
        if total > result.best_reward:
            result.policy.load_state_dict(policy.state_dict())
            result.best_episode, result.best_reward = episode, total
        _reinforce_step(policy, optimizer, states, keeps, weights, config, dist)
        bar.set_postfix(reward=f"{total:.1f}", best=f"{result.best_reward:.1f}")
        result.episode_seconds.append(time.perf_counter() - episode_start)
    result.seconds = time.perf_counter() - start
    log.info("trained policy: best total reward %.2f at episode %d", result.best_reward, result.best_episode)
    return result


def _layers(states: Sequence[torch.Tensor], layers: range) -> Sequence[torch.Tensor]:
    """The state matrices of ``layers``: ``states`` itself when that is all of them, else a lazy view."""
    if len(layers) == len(states):
        return states
    if isinstance(states, StateSequence):
        return _LayerView(states, layers)
    return [states[i] for i in layers]  # views of weights: no copies


class _LayerView(StateSequence):
    """Some layers of a :class:`StateSequence`, still loaded on access."""

    def __init__(self, states: StateSequence, layers: range):
        self.states, self.layers = states, layers
        self.shape, self.dtype, self.device = states.shape, states.dtype, states.device

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.states[self.layers[i]]


def _reinforce_step(
    policy, optimizer, states, keeps, weights, config: TrainConfig, dist: Distributed | None = None
) -> None:
    """The episode's REINFORCE updates: one clipped AdamW step per layer, in layer order.

    Layer ``i`` contributes ``-gamma^i R_i log p(keep_i)`` (+ the KL term). Stepping per layer (as
    the reference implementation does) gives ``L`` updates per episode instead of one; gradients
    are clipped *before* each step. Each layer's graph (holding its ``(n, d)`` state in float32)
    is freed by its own backward, so memory stays at one layer's worth. In a distributed job the
    layer's owner computes the gradient and broadcasts it; every rank then steps identically.
    """
    dist = dist or Distributed()
    params = list(policy.parameters())
    for i, (keep, weight) in enumerate(zip(keeps, weights, strict=True)):
        optimizer.zero_grad(set_to_none=True)
        owner = dist.owner(i, len(keeps))
        if owner == dist.rank:
            logits = policy.logits(states[i])
            loss = -weight * kept_log_prob(logits, keep.to(logits.device))
            if config.kl_weight:
                loss = loss + config.kl_weight * kl_to_half(logits)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite REINFORCE loss {loss.item()} (reward weight {weight.item()})")
            loss.backward()
        if dist.active:
            _share_gradients(params, owner, dist)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
        optimizer.step()


def _share_gradients(params: list[torch.nn.Parameter], owner: int, dist: Distributed) -> None:
    """Give every rank ``owner``'s gradients (one flat broadcast: a bit-exact copy)."""
    flat = torch.cat([p.grad.flatten() for p in params]) if owner == dist.rank else None
    if flat is None:
        flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    dist.broadcast(flat, owner)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
