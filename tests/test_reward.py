"""The spectral reward against independent references: scipy's KS statistic, float64 SVD."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from tiny_models import spectral_ks

import prunenet.ops as ops
import prunenet.reward as reward
from prunenet.ops import RewardBackendError, resolve_reward_backend
from prunenet.reward import (
    REWARD_AT_ZERO,
    episode_rewards,
    ks_statistic,
    prepare_reward,
    reference_spectra,
    singular_values,
)


@pytest.mark.parametrize(
    "p, q, ties",
    [(50, 37, True), (576, 576, False), (576, 431, False), (1, 9, True), (1000, 17, True)],
    ids=["50v37-ties", "576v576", "576v431", "1v9", "1000v17-ties"],
)
def test_ks_statistic_equals_scipy_exactly(p, q, ties):
    rng = np.random.default_rng(p * 1000 + q)
    for _ in range(20):
        if ties:
            x, y = rng.integers(0, 7, p).astype(float), rng.integers(0, 7, q).astype(float)
        else:
            x, y = rng.standard_normal(p), rng.standard_normal(q) * 1.3 + 0.1
        assert ks_statistic(torch.from_numpy(x), torch.from_numpy(y)).item() == scipy.stats.ks_2samp(x, y).statistic


def test_ks_statistic_is_batched():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 60)), rng.standard_normal((4, 45))
    got = ks_statistic(torch.from_numpy(x), torch.from_numpy(y))
    assert got.shape == (4,)
    for i in range(4):
        assert got[i].item() == scipy.stats.ks_2samp(x[i], y[i]).statistic


def test_ks_of_identical_samples_is_zero_and_reward_is_capped():
    x = torch.randn(100)
    assert ks_statistic(x, x[torch.randperm(100)]).item() == 0.0
    w = torch.randn(40, 12)
    assert episode_rewards([w], [torch.arange(40)], reference_spectra([w])).item() == REWARD_AT_ZERO


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_singular_values_match_float64(dtype):
    w = torch.randn(431, 123).to(dtype)
    ref = torch.linalg.svdvals(w.double()).flip(-1)
    got = singular_values(w)
    assert got.dtype == torch.float32 and bool((got[1:] >= got[:-1]).all())
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_episode_rewards_equal_per_layer_scipy_reference():
    states = [torch.randn(90, 24) * (1 + i) for i in range(5)]
    g = torch.Generator().manual_seed(0)
    keeps = [torch.randperm(90, generator=g)[:61].sort().values for _ in states]
    got = episode_rewards(states, keeps, reference_spectra(states))
    for i, (w, keep) in enumerate(zip(states, keeps, strict=True)):
        assert got[i].item() == pytest.approx(1.0 / spectral_ks(w, w[keep]), rel=1e-12)


def test_episode_rewards_chunking_does_not_change_results(monkeypatch):
    import prunenet.reward as reward

    states = [torch.randn(50, 16) for _ in range(7)]
    keeps = [torch.arange(0, 50, 2) for _ in states]
    refs = reference_spectra(states)
    whole = episode_rewards(states, keeps, refs)
    monkeypatch.setattr(reward, "CHUNK_BYTES", 3 * 4 * 25 * 16)  # three layers per chunk
    assert torch.equal(episode_rewards(states, keeps, refs), whole)


def test_episode_rewards_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="2 states, 1 keeps"):
        episode_rewards([torch.randn(4, 2)] * 2, [torch.arange(2)], [torch.ones(2)] * 2)


def test_torch_path_complement_route_equals_direct_route_and_float64_svd():
    """k = 210 of 300 rows: prepare_reward keeps W^T W and the episode subtracts the 90 dropped rows;
    plain reference spectra take the direct route. Both equal the float64 SVD + scipy rewards."""
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(300, 40, generator=g) * torch.linspace(0.2, 2, 300)[:, None] for _ in range(6)]
    keeps = [torch.randperm(300, generator=g)[:210].sort().values for _ in states]
    prepared = prepare_reward(states, 210, backend="torch")
    assert prepared.full_grams is not None and prepared.full_grams.shape == (6, 40, 40)
    complement = episode_rewards(states, keeps, prepared)
    direct = episode_rewards(states, keeps, reference_spectra(states), backend="torch")
    assert torch.equal(complement, direct)
    for i, (w, keep) in enumerate(zip(states, keeps, strict=True)):
        assert direct[i].item() == pytest.approx(1.0 / spectral_ks(w, w[keep]), rel=1e-12)


def test_prepare_reward_keeps_full_grams_only_when_the_complement_pays():
    states = [torch.randn(100, 8) for _ in range(2)]
    assert prepare_reward(states, 60, "torch").full_grams is not None
    assert prepare_reward(states, 40, "torch").full_grams is None
    assert prepare_reward(states, None, "torch").full_grams is None


def test_spectra_from_gram_returns_the_top_values_clamped():
    w = torch.randn(5, 12)  # rank 5: G = W^T W (12 x 12) has 7 zero eigenvalues
    got = reward.spectra_from_gram((w.mT @ w)[None], 5)
    torch.testing.assert_close(got[0].double(), torch.linalg.svdvals(w.double()).flip(-1), rtol=1e-5, atol=1e-5)
    assert bool((reward.spectra_from_gram((w.mT @ w)[None], 12) >= 0).all())


def test_resolve_reward_backend(monkeypatch):
    assert resolve_reward_backend("auto", "cpu") == "torch"
    assert resolve_reward_backend("torch", "cuda") == "torch"
    with pytest.raises(ValueError, match="unknown reward backend 'jax'"):
        resolve_reward_backend("jax", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops, "triton_available", lambda: True)
    with pytest.raises(RewardBackendError, match="runs on CUDA devices, but the model is on cpu"):
        resolve_reward_backend("triton", "cpu")
    assert resolve_reward_backend("auto", "cuda") == "triton"
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    with pytest.raises(RewardBackendError, match="needs the triton package"):
        resolve_reward_backend("triton", "cuda")
    assert resolve_reward_backend("auto", "cuda") == "torch"


def test_spilled_gram_matrices_give_identical_rewards():
    """W^T W kept in a temporary file (streaming under a small memory budget) changes nothing."""
    g = torch.Generator().manual_seed(3)
    states = [torch.randn(60, 16, generator=g) for _ in range(4)]
    keeps = [torch.randperm(60, generator=g)[:45].sort().values for _ in range(4)]
    in_memory = prepare_reward(states, 45, "torch")
    spilled = prepare_reward(states, 45, "torch", spill_grams=True)
    assert not isinstance(spilled.full_grams, torch.Tensor) and spilled.full_grams.shape == (4, 16, 16)
    assert torch.equal(spilled.full_grams[0:4], in_memory.full_grams)
    assert torch.equal(episode_rewards(states, keeps, spilled), episode_rewards(states, keeps, in_memory))


@pytest.mark.parametrize("k", [5, 21, 39], ids=["few", "half", "all-but-one"])
def test_states_with_fewer_rows_than_columns_use_the_row_gram_and_match_float64_svd(k):
    """n = 40 < d = 96 (an expert's shape): W W^T (n x n) is kept, each episode gathers its (keep, keep)
    block; the plain-reference path multiplies W[keep] W[keep]^T. Both equal the float64 SVD + scipy rewards."""
    g = torch.Generator().manual_seed(1)
    states = [torch.randn(40, 96, generator=g) * torch.linspace(0.3, 3, 40)[:, None] for _ in range(5)]
    keeps = [torch.randperm(40, generator=g)[:k].sort().values for _ in states]
    prepared = prepare_reward(states, k, backend="torch")
    assert prepared.full_grams.shape == (5, 40, 40) and prepared.spectra.shape == (5, 40)
    gathered = episode_rewards(states, keeps, prepared)
    direct = episode_rewards(states, keeps, reference_spectra(states), backend="torch")
    for i, (w, keep) in enumerate(zip(states, keeps, strict=True)):
        assert gathered[i].item() == pytest.approx(1.0 / spectral_ks(w, w[keep]), rel=1e-12)
        assert direct[i].item() == pytest.approx(1.0 / spectral_ks(w, w[keep]), rel=1e-12)
    spilled = prepare_reward(states, k, "torch", spill_grams=True)
    assert torch.equal(spilled.full_grams[0:5], prepared.full_grams)
    assert torch.equal(episode_rewards(states, keeps, spilled), gathered)


def test_the_triton_backend_takes_the_row_gram_route_too(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(2)
    states = [torch.randn(24, 64, generator=g) for _ in range(3)]
    keeps = [torch.randperm(24, generator=g)[:17].sort().values for _ in states]
    torch_path = episode_rewards(states, keeps, prepare_reward(states, 17, "torch"))
    assert torch.equal(episode_rewards(states, keeps, prepare_reward(states, 17, "triton")), torch_path)


def test_the_memory_plan_counts_the_row_gram_for_states_with_fewer_rows_than_columns():
    from prunenet.memory_plan import plan_memory

    plan = plan_memory(512, 768, 2048, 2, 536, 2**40)  # Qwen3-30B-A3B's experts, 4 blocks
    assert plan.gram_bytes == 512 * 768 * 768 * 4
    assert plan_memory(32, 11008, 4096, 2, 7705, 2**40).gram_bytes == 32 * 4096 * 4096 * 4  # LLaMA-2-7B
