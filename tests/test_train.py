"""REINFORCE training: best policy kept, gradients clipped before the step, states left untouched,
and the memory-saving layer-by-layer backward equal to the gradient of the written-out loss."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

import prunenet.train as train
from prunenet.policy import select_rows
from prunenet.train import TrainConfig, make_policy, train_policy


def low_rank_states(layers=4, n=120, d=24):
    """States whose rows differ strongly in norm, so the choice of rows matters to the spectrum."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, d, generator=g) * torch.linspace(0.1, 3, n)[:, None] for _ in range(layers)]


def test_training_leaves_states_untouched_and_is_reproducible():
    states = low_rank_states()
    copies = [w.clone() for w in states]
    a = train_policy(states, 80, TrainConfig(episodes=5, seed=3), progress=False)
    b = train_policy(states, 80, TrainConfig(episodes=5, seed=3), progress=False)
    assert all(torch.equal(w, c) for w, c in zip(states, copies, strict=True))
    assert a.episode_rewards == b.episode_rewards
    for p, q in zip(a.policy.parameters(), b.policy.parameters(), strict=True):
        assert torch.equal(p, q)


def test_best_policy_is_the_one_that_produced_the_best_episode(monkeypatch):
    rigged = [1.0, 5.0, 2.0, 9.0, 3.0, 4.0]
    calls = iter(rigged)
    monkeypatch.setattr(train, "episode_rewards", lambda states, keeps, refs: torch.full((len(states),), next(calls)))
    snapshots = []
    real_step = train._reinforce_step

    def spy(policy, *args):
        snapshots.append({k: v.clone() for k, v in policy.state_dict().items()})
        real_step(policy, *args)

    monkeypatch.setattr(train, "_reinforce_step", spy)
    result = train_policy(low_rank_states(), 80, TrainConfig(episodes=len(rigged)), progress=False)
    assert result.best_episode == 3
    best = snapshots[3]
    assert all(torch.equal(v, best[k]) for k, v in result.policy.state_dict().items())
    assert not all(torch.equal(v, snapshots[0][k]) for k, v in result.policy.state_dict().items())


def test_gradients_are_clipped_before_the_optimizer_step(monkeypatch):
    norms = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    train_policy(low_rank_states(), 80, TrainConfig(episodes=4, max_grad_norm=0.5), progress=False)
    assert len(norms) == 4 * 4  # one step per layer per episode
    assert max(norms) <= 0.5 + 1e-5


def test_each_layer_step_uses_the_gradient_of_the_written_out_loss():
    """Layer i's update direction is the gradient of -gamma^i R_i sum_{j in keep} log alpha_j + KL term,
    computed here from the literal O(n^2 d) policy form in float64."""
    from prunenet.policy import kl_to_half

    states = [w.double() for w in low_rank_states(layers=3)]
    policy = make_policy(24, 120, seed=1).double()
    keeps = [
        select_rows(policy.logits(w).detach(), 70, "sample", torch.Generator().manual_seed(i))
        for i, w in enumerate(states)
    ]
    weights = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    cfg = TrainConfig(kl_weight=0.7, max_grad_norm=1e9)
    seen = []

    class RecordingOptimizer:
        """Checks the gradient before each step, then applies a plain SGD step."""

        def zero_grad(self, set_to_none=True):
            policy.zero_grad(set_to_none=set_to_none)

        def step(self):
            i = len(seen)
            reference = copy.deepcopy(policy)
            alpha = torch.sigmoid(reference.logits_literal(states[i]))
            loss = -weights[i] * alpha[keeps[i]].log().sum() + 0.7 * kl_to_half(reference.logits_literal(states[i]))
            loss.backward()
            for got, want in zip(policy.parameters(), reference.parameters(), strict=True):
                torch.testing.assert_close(got.grad, want.grad)
            seen.append(i)
            with torch.no_grad():
                for p in policy.parameters():
                    p -= 1e-3 * p.grad

    train._reinforce_step(policy, RecordingOptimizer(), states, keeps, weights, cfg)
    assert seen == [0, 1, 2]


def test_k_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="k must be in"):
        train_policy(low_rank_states(), 0, TrainConfig(episodes=1), progress=False)


def redundant_states(layers: int = 3, strong: int = 48, weak: int = 24, d: int = 16) -> list[torch.Tensor]:
    """Each layer: ``strong`` rows sharing a mean direction, and ``weak`` rows of norm ~1e-3 shuffled in.

    Keeping exactly the strong rows (k = strong) leaves the spectrum almost as it is, so a selection can
    earn far more than a random one; and a linear policy can find them (its logits ``W u`` along the
    shared mean tell them apart).
    """
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(layers):
        rows = torch.cat([torch.randn(d, generator=g) + 0.5 * torch.randn(strong, d, generator=g),
                          1e-3 * torch.randn(weak, d, generator=g)])  # fmt: skip
        out.append(rows[torch.randperm(strong + weak, generator=g)])
    return out


def test_the_trained_policy_beats_the_median_of_20_random_selections():
    from prunenet.reward import episode_rewards, reference_spectra
    from prunenet.selectors import policy_keeps, random_keeps

    states, k = redundant_states(), 48
    reference = reference_spectra(states)

    def total(keeps):
        return float(episode_rewards(states, keeps, reference).sum())

    random = [total(random_keeps(len(states), states[0].shape[0], k, seed)) for seed in range(20)]
    result = train_policy(states, k, TrainConfig(seed=0), progress=False)  # the CLI's 20 episodes
    assert result.best_reward > statistics.median(random)  # discounted total of the best sampled episode
    assert total(policy_keeps(states, k, result.policy, "topk")) > max(random)
