"""The policy: the O(n d) logits equal the paper's literal O(n^2 d) form; sampling and selection."""

from __future__ import annotations

import math

import pytest
import torch

from prunenet.policy import (
    SparsityPredictor,
    check_policy_shape,
    kept_log_prob,
    kl_to_half,
    log_scores,
    sample_without_replacement,
    select_rows,
    skip_selection,
)


@pytest.mark.parametrize("n, d", [(431, 123), (7, 5), (1536, 576)], ids=["431x123", "7x5", "1536x576"])
def test_cheap_logits_equal_literal_form(n, d):
    policy = SparsityPredictor(d, n).double()
    w = torch.randn(n, d, dtype=torch.float64)
    torch.testing.assert_close(policy.logits(w), policy.logits_literal(w), rtol=1e-10, atol=1e-10)


def test_cheap_logits_equal_literal_form_in_float32_and_batched():
    policy = SparsityPredictor(64, 300)
    w = torch.randn(3, 300, 64)
    torch.testing.assert_close(policy.logits(w), policy.logits_literal(w), rtol=1e-4, atol=1e-4)
    assert policy.logits(w).shape == (3, 300)


def test_gradients_of_both_forms_agree():
    policy = SparsityPredictor(17, 29).double()
    w = torch.randn(29, 17, dtype=torch.float64)
    grads = []
    for fn in (policy.logits, policy.logits_literal):
        policy.zero_grad()
        (fn(w).sin().sum()).backward()
        grads.append([p.grad.clone() for p in policy.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_log_scores_are_log_of_relaxed_bernoulli_scores():
    logits = torch.tensor([-3.0, 0.0, 2.5, 40.0, -40.0])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    u = torch.rand(5, generator=g1).clamp(1e-7, 1 - 1e-7).double()
    alpha = torch.sigmoid(logits.double())
    expected = torch.sigmoid(torch.log(u / (1 - u)) + torch.log(alpha / (1 - alpha))).log()
    torch.testing.assert_close(log_scores(logits, g2).double(), expected, rtol=1e-5, atol=1e-5)


def test_sampling_without_replacement_matches_sequential_multinomial_marginals():
    # P(index 0 is among the 2 drawn) for weights w, drawn sequentially without replacement.
    w = torch.tensor([0.5, 0.2, 0.2, 0.1])
    exact = w[0] + sum(w[j] * w[0] / (1 - w[j]) for j in range(1, 4))
    g = torch.Generator().manual_seed(0)
    trials = 20000
    hits = sum(int(0 in sample_without_replacement(w.log(), 2, g).tolist()) for _ in range(trials))
    assert abs(hits / trials - float(exact)) < 4 * math.sqrt(exact * (1 - exact) / trials)


def test_sampling_survives_underflowing_weights():
    # exp(-200) is 0 in float32: torch.multinomial would refuse; log-space sampling does not.
    log_w = torch.full((50,), -200.0)
    log_w[:3] = 0.0
    keep = sample_without_replacement(log_w, 10, torch.Generator().manual_seed(0))
    assert keep.numel() == 10 and keep.unique().numel() == 10
    assert {0, 1, 2} <= set(keep.tolist())


@pytest.mark.parametrize("selection", ["sample", "topk"])
def test_select_rows_returns_sorted_unique_k(selection):
    logits = torch.randn(1075)
    keep = select_rows(logits, 700, selection, torch.Generator().manual_seed(1))
    assert keep.dtype == torch.int64 and keep.shape == (700,)
    assert bool((keep[1:] > keep[:-1]).all()) and 0 <= keep[0] and keep[-1] < 1075


def test_topk_selection_keeps_most_probable_rows():
    logits = torch.tensor([0.1, 5.0, -2.0, 3.0, 0.0])
    assert select_rows(logits, 2, "topk").tolist() == [1, 3]


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(300)
    a = select_rows(logits, 100, "sample", torch.Generator().manual_seed(3))
    b = select_rows(logits, 100, "sample", torch.Generator().manual_seed(3))
    c = select_rows(logits, 100, "sample", torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_selection_is_rejected():
    with pytest.raises(ValueError, match="sample, topk"):
        select_rows(torch.randn(4), 2, "best")


def test_kept_log_prob_is_finite_for_extreme_logits():
    logits = torch.tensor([-1e4, -200.0, 0.0, 200.0], requires_grad=True)
    value = kept_log_prob(logits, torch.tensor([0, 1, 2]))
    assert torch.isfinite(value)
    torch.testing.assert_close(value.detach(), torch.tensor(-1e4 - 200.0 - math.log(2)))
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_kl_to_half_matches_float64_definition():
    logits = torch.tensor([-30.0, -2.0, 0.0, 1.5, 30.0])
    p = torch.sigmoid(logits.double())
    ref = (p * torch.log(2 * p) + (1 - p) * torch.log(2 * (1 - p))).nan_to_num(0.0).mean()
    assert torch.isfinite(kl_to_half(logits))
    torch.testing.assert_close(kl_to_half(logits).double(), ref, rtol=1e-5, atol=1e-6)
    assert kl_to_half(torch.zeros(10)).abs() < 1e-6


def test_policy_shape_mismatch_names_both_shapes():
    policy = SparsityPredictor(576, 1536)
    check_policy_shape(policy, 576, 1536)
    with pytest.raises(ValueError, match=r"n=1536, d=576.*n=2048, d=576"):
        check_policy_shape(policy, 576, 2048)


@pytest.mark.parametrize("selection", ["sample", "topk"])
def test_skip_selection_consumes_exactly_what_select_rows_draws(selection):
    """Distributed ranks skip other ranks' layers this way; the draws of later layers must not shift."""
    logits = torch.randn(57, generator=torch.Generator().manual_seed(0))
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    select_rows(logits, 20, selection, a)
    skip_selection(57, selection, b)
    assert torch.equal(a.get_state(), b.get_state())
    assert torch.equal(select_rows(logits, 20, "sample", a), select_rows(logits, 20, "sample", b))
