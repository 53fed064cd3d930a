"""Triton kernels (prunenet.kernels) against float64 / scipy references, and the two reward backends.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1`` is set
in conftest.py before triton is imported); that is what CI runs. On a CUDA machine the same tests
run the compiled kernels on the GPU, plus the ``gpu`` tests (full-size shapes, half precision on
tensor cores). ``test_kernels_compile_for_sm80_and_sm90`` compiles the real GPU binaries without a
GPU (triton ships ptxas), so type or layout errors that the interpreter tolerates still fail here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch

pytest.importorskip("triton")

from prunenet.kernels import gram as kgram  # noqa: E402
from prunenet.kernels import ks as kks  # noqa: E402

from prunenet import ops, reward  # noqa: E402
from prunenet.ops import complement_rows, use_complement  # noqa: E402
from prunenet.selectors import random_keeps  # noqa: E402
from prunenet.train import TrainConfig, train_policy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# (n, d, k): odd shapes; 1536 x 576 keeping 1075 is SmolLM2-135M at ratio 0.3.
SHAPES = [(600, 123, 431), (1536, 576, 1075)]
SHAPE_IDS = ["n600-d123-k431", "n1536-d576-k1075"]


def spread_states(layers: int, n: int, d: int, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """Random ``(n, d)`` weights whose rows differ in scale, so the spectrum is spread out (condition
    number 4 at d=123, 10 at d=576 after slicing; SmolLM2-135M's real gate_proj: 30)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 2.0, n)[torch.randperm(n, generator=g)][:, None]
    return [(torch.randn(n, d, generator=g) * scale * 0.05).to(dtype).to(DEVICE) for _ in range(layers)]


def stacked_keeps(layers: int, n: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.stack(random_keeps(layers, n, k, seed)).to(DEVICE)


def float32_baseline(states, keeps, complement: bool) -> torch.Tensor:
    """What torch itself computes in float32 by the same route: the error budget of the kernel."""
    if not complement:
        return kgram.kept_gram_ref(states, keeps, torch.float32)
    n = states[0].shape[0]
    full = kgram.kept_gram_ref(states, torch.arange(n).expand(len(states), n), torch.float32)
    drop = complement_rows(keeps, n)
    return full - kgram.kept_gram_ref(states, drop, torch.float32)


# ---------------------------------------------------------------------------------------------- Gram


@pytest.mark.parametrize("route", ["direct", "complement"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n, d, k", SHAPES, ids=SHAPE_IDS)
def test_gram_matches_float64(n, d, k, dtype, route):
    states = spread_states(3, n, d, dtype)
    keeps = stacked_keeps(3, n, k)
    full = kgram.full_gram(states) if route == "complement" else None
    if route == "complement":
        assert use_complement(n, k, "triton")  # so kept_gram takes that route
    got = kgram.kept_gram(states, keeps, full)
    ref = kgram.kept_gram_ref(states, keeps)  # float64 of the same (rounded-to-dtype) weights
    assert got.shape == (3, d, d) and got.dtype == torch.float32
    err = (got.double() - ref).abs().max().item()
    budget = (float32_baseline(states, keeps, route == "complement").double() - ref).abs().max().item()
    ulp = ref.abs().max().item() * 2.0**-23
    assert err <= 2 * budget + ulp, f"max error {err:.3g}, float32 torch {budget:.3g}"


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "row-slice", "descending", "unaligned"])
def test_gram_small_tiles_ragged_edges_and_strided_weights(layout):
    """32 x 32 tiles over d=123 (4 tile rows, ragged last tile, mirrored off-diagonal stores), 16-row
    blocks over R=431 (ragged), on the weight layouts adapters hand out (GPT-2's transposed Conv1D
    weight, Phi-3's gate half of the fused gate_up_proj), on layers at lower addresses than the first
    (negative offsets) and on layers not 16-byte aligned (element-wise addressing)."""
    n, d, k = 600, 123, 431
    base = spread_states(3, 2 * n if layout == "row-slice" else n, d)
    if layout == "transposed":
        states = [w.t().contiguous().t() for w in base]  # (n, d) with strides (1, n)
    elif layout == "row-slice":
        states = [w[:n] for w in base]
    elif layout in ("descending", "unaligned"):
        flat = torch.cat([w.flatten() for w in base] + [base[0].new_zeros(1)])
        start = 1 if layout == "unaligned" else 0  # 4 bytes past an aligned address
        states = [flat[start + i * n * d : start + (i + 1) * n * d].view(n, d) for i in reversed(range(3))]
    else:
        states = base
    keeps = stacked_keeps(3, n, k)
    got = kgram.gram_rows(states, keeps, blocks=(32, 16))
    ref = kgram.kept_gram_ref(states, keeps)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
    # Off-diagonal tiles are stored twice from one accumulator: exact mirrors of each other.
    block = torch.arange(d) // 32
    off = (block[:, None] != block[None, :]).to(DEVICE)
    assert torch.equal(got[:, off], got.mT[:, off])


def test_gram_rows_edge_cases():
    states = spread_states(2, 50, 20)
    empty = kgram.gram_rows(states, torch.zeros(2, 0, dtype=torch.long))
    assert torch.equal(empty, torch.zeros(2, 20, 20, device=DEVICE))
    base = torch.randn(2, 20, 20, device=DEVICE)
    assert torch.equal(kgram.gram_rows(states, torch.zeros(0, dtype=torch.long), base=base), base)
    shared = kgram.gram_rows(states, torch.tensor([3, 3, 7]))  # one index vector for all layers, repeats count
    torch.testing.assert_close(
        shared.double(), kgram.kept_gram_ref(states, torch.tensor([[3, 3, 7]] * 2)), rtol=1e-6, atol=1e-7
    )
    with pytest.raises(ValueError, match=r"row indices must be in \[0, 50\)"):
        kgram.gram_rows(states, torch.tensor([0, 50]))
    with pytest.raises(ValueError, match="share shape"):
        kgram.gram_rows([states[0], states[1][:40]], torch.tensor([0]))
    states = spread_states(2, 100, 20)  # k = 90 of 100 takes the complement route, which needs distinct rows
    with pytest.raises(ValueError, match="distinct"):
        kgram.kept_gram(states, torch.tensor([[1, 1] + list(range(2, 90))] * 2), kgram.full_gram(states))


# ------------------------------------------------------------------------------------------- spectra


@pytest.mark.parametrize("route", ["direct", "complement"])
@pytest.mark.parametrize("n, d, k", SHAPES, ids=SHAPE_IDS)
def test_spectra_match_float64_svd(n, d, k, route):
    """Top half of the spectrum within 1e-3 relative (asserted). Bottom half, measured: about 2e-6
    (d=123) and 2e-5 (d=576) here, 8e-5 on SmolLM2-135M's real gate_proj weights (the smallest
    singular value is the worst); asserted below 1e-3 as well, so float32 eigen-solves suffice."""
    states = spread_states(2, n, d)
    keeps = stacked_keeps(2, n, k)
    full = kgram.full_gram(states) if route == "complement" else None
    spectra = reward.spectra_from_gram(kgram.kept_gram(states, keeps, full), min(k, d)).double()
    exact = torch.stack([torch.linalg.svdvals(w[kp].double()).flip(-1) for w, kp in zip(states, keeps, strict=True)])
    rel = (spectra - exact).abs() / exact
    top, bottom = rel[:, d // 2 :].max().item(), rel[:, : d // 2].max().item()
    assert top <= 1e-3, top
    assert bottom <= 1e-3, bottom


# ------------------------------------------------------------------------------------------------ KS


def ks_cases():
    rng = np.random.default_rng(7)
    for p, q, ties in [(50, 37, True), (576, 576, False), (576, 431, False), (1, 9, True), (1000, 17, True)]:
        if ties:  # few distinct values: ties within and across the samples
            yield f"{p}v{q}-ties", rng.integers(0, 7, (6, p)).astype(float), rng.integers(0, 7, (6, q)).astype(float)
        else:
            yield f"{p}v{q}", rng.standard_normal((6, p)), rng.standard_normal((6, q)) * 1.3 + 0.1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name, x, y", list(ks_cases()), ids=[c[0] for c in ks_cases()])
def test_ks_equals_scipy_exactly(name, x, y, dtype):
    x, y = x.astype(np.float32 if dtype == torch.float32 else np.float64), y.astype(x.dtype)
    tx, ty = torch.from_numpy(x).to(DEVICE, dtype), torch.from_numpy(y).to(DEVICE, dtype)
    got = kks.ks_statistic(tx, ty).cpu()  # six rows, one launch
    ref = kks.ks_statistic_ref(tx, ty).cpu()
    torch_path = reward.ks_statistic(tx, ty).cpu()
    for i in range(len(x)):
        expected = scipy.stats.ks_2samp(x[i], y[i]).statistic
        assert got[i].item() == expected and ref[i].item() == expected and torch_path[i].item() == expected


def test_ks_identical_and_disjoint_samples_and_shapes():
    x = torch.randn(3, 40, device=DEVICE)
    assert torch.equal(kks.ks_statistic(x, x.flip(-1)).cpu(), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(kks.ks_statistic(x, x + 100).cpu(), torch.ones(3, dtype=torch.float64))
    assert kks.ks_statistic(torch.randn(2, 4, 10, device=DEVICE), torch.randn(2, 4, 7, device=DEVICE)).shape == (2, 4)
    with pytest.raises(ValueError, match="leading dimensions"):
        kks.ks_statistic(torch.randn(3, 5, device=DEVICE), torch.randn(2, 5, device=DEVICE))


# ------------------------------------------------------------------------------------ the whole reward


def tiny_states(name: str) -> list[torch.Tensor]:
    from tiny_models import tiny_model

    from prunenet.adapters import get_adapter

    model = tiny_model(name).to(DEVICE)
    adapter = get_adapter(model.config)
    return [adapter.layer_state(model, i) for i in range(adapter.num_layers(model.config))]


@pytest.mark.parametrize(
    "states_of, ratio",
    [(lambda: tiny_states("llama"), 0.3), (lambda: tiny_states("gpt2"), 0.6), (lambda: spread_states(4, 300, 48), 0.3)],
    ids=["tiny-llama-0.3", "tiny-gpt2-transposed-0.6", "4x300x48-0.3"],
)
def test_both_backends_train_the_same_policy(states_of, ratio):
    """Same seed, same states: the REINFORCE runs with the torch and the triton reward give the same
    reward trace within 1e-6 relative. (Both compute the exact KS statistic, so they could differ
    only where float32 rounding reorders a sliced singular value and a reference one that agree to
    ~1e-6; on these cases the traces are identical.)"""
    states = states_of()
    k = int((1 - ratio) * states[0].shape[0])
    runs = {
        b: train_policy(states, k, TrainConfig(episodes=5, reward_backend=b), progress=False)
        for b in ("torch", "triton")
    }
    assert runs["torch"].reward_backend == "torch" and runs["triton"].reward_backend == "triton"
    np.testing.assert_allclose(runs["triton"].episode_rewards, runs["torch"].episode_rewards, rtol=1e-6)
    assert runs["triton"].best_episode == runs["torch"].best_episode


def test_episode_rewards_backends_agree_per_layer():
    states = spread_states(5, 200, 40, torch.float16)
    keeps = list(stacked_keeps(5, 200, 140))
    rewards = {}
    for backend in ("torch", "triton"):
        ref = reward.prepare_reward(states, 140, backend)
        assert (ref.full_grams is not None) and ref.backend == backend
        rewards[backend] = reward.episode_rewards(states, keeps, ref)
    torch.testing.assert_close(rewards["triton"], rewards["torch"], rtol=1e-6, atol=0)
    # Plain reference spectra (no full Gram: the direct route) give the same rewards.
    plain = reward.reference_spectra(states)
    torch.testing.assert_close(
        reward.episode_rewards(states, keeps, plain, "triton"), rewards["torch"], rtol=1e-6, atol=0
    )


# ------------------------------------------------------------------------------------------ GPU build


_COMPILE = r"""
import re, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from prunenet.kernels.gram import _config, _gram_kernel
from prunenet.kernels.ks import _ks_kernel
# Specialisations as a launch on row-major weights would get them: unit column stride, 16-byte
# aligned pointers, row stride and d multiples of 16.
pointers = dict(w_base=None, w_offsets="*i64", rows_ptr="*i32", base_ptr="*fp32", out_ptr="*fp32",
                tile_i_ptr="*i32", tile_j_ptr="*i32")
scalars = dict(R="i32", D="i32", stride_row="i32", rows_layer_stride="i32")
names = list(pointers) + list(scalars)
attrs = {(names.index(p),): [["tt.divisibility", 16]] for p in [*pointers, "D", "stride_row"]}
for arch in (80, 90):
    for dtype, ty in ((torch.float32, "*fp32"), (torch.float16, "*fp16"), (torch.bfloat16, "*bf16")):
        for subtract in (False, True):
            cfg = _config(dtype)
            opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            consts = dict(cfg, SUBTRACT=subtract, VEC=16 // dtype.itemsize, stride_col=1)
            sig = dict(pointers, w_base=ty, **scalars, **{c: "constexpr" for c in consts})
            kernel = triton.compile(ASTSource(_gram_kernel, sig, consts, attrs), GPUTarget("cuda", arch, 32), opts)
            ptx = kernel.asm["ptx"]
            # 16-bit inputs must reach the tensor cores, and the weights must load as 16-byte vectors.
            assert ("mma" in ptx) == (dtype != torch.float32), (arch, dtype)
            assert not re.search(r"ld\.global(\.\w+)*\.b16", ptx), (arch, dtype, "scalar 2-byte loads")
    ks_sig = dict(x_ptr="*fp32", y_ptr="*fp32", out_ptr="*i64", P="i32", Q="i32", P_RED="i32", Q_RED="i32",
                  STEPS_P="constexpr", STEPS_Q="constexpr", BLOCK="constexpr")
    src = ASTSource(_ks_kernel, ks_sig, dict(STEPS_P=10, STEPS_Q=11, BLOCK=256))
    triton.compile(src, target=GPUTarget("cuda", arch, 32))
print("compiled")
"""


def test_kernels_compile_for_sm80_and_sm90():
    """The kernels as the GPU would run them, compiled to cubins for A100 and H100 (no GPU needed)."""
    from triton.backends.nvidia import compiler as nvidia

    try:
        nvidia.get_ptxas_version(90)
    except Exception as err:  # no usable ptxas with this triton build
        pytest.skip(f"no ptxas: {err}")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_llama7b_layer_gram_and_spectrum(dtype):
    """One LLaMA-2-7B-shaped layer (11008 x 4096, ratio 0.3) on tensor cores, both routes."""
    n, d, k = 11008, 4096, 7705
    states = spread_states(1, n, d, dtype)
    keeps = stacked_keeps(1, n, k)
    ref = kgram.kept_gram_ref(states, keeps)
    for full in (None, kgram.full_gram(states)):
        got = kgram.kept_gram(states, keeps, full)
        budget = (float32_baseline(states, keeps, full is not None).double() - ref).abs().max().item()
        assert (got.double() - ref).abs().max().item() <= 2 * budget + ref.abs().max().item() * 2.0**-23
    spectra = reward.spectra_from_gram(got, d).double()
    exact = torch.linalg.svdvals(states[0][keeps[0]].double()).flip(-1)
    assert ((spectra[0] - exact).abs() / exact)[d // 2 :].max().item() <= 1e-3


@pytest.mark.gpu
def test_gpu_auto_backend_is_triton():
    assert ops.resolve_reward_backend("auto", "cuda") == "triton"
