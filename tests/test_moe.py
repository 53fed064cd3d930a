"""Mixture-of-experts specifics: each expert keeps its own neurons in the fused tensors, the router and the
expert count are untouched, the kept width suits the fused experts' grouped matmul, and the families and
methods that cannot be pruned are refused in one line (the shared equivalences are in test_adapters.py and
test_streaming.py)."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import CONFIGS, save_tiny_model, tiny_model

from prunenet.activations import activation_stats, out_module
from prunenet.adapters import REFUSED, UnsupportedModelError, get_adapter
from prunenet.checkpoint import read_manifest
from prunenet.pipeline import compress
from prunenet.selectors import random_keeps
from prunenet.selfcal import neuron_scores
from prunenet.slicing import slice_model_

MOE_FAMILIES = sorted(name for name, make in CONFIGS.items() if get_adapter(make()).experts_attr is not None)


def test_the_moe_families_are_the_configs_that_route_tokens_to_experts():
    """The adapters treat a family as a mixture of experts exactly when its config routes each token to some of
    its experts; the tests below run on these families."""
    routed = sorted(name for name, make in CONFIGS.items() if getattr(make(), "num_experts_per_tok", None))
    assert MOE_FAMILIES and MOE_FAMILIES == routed


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_each_expert_keeps_its_own_rows_and_columns_and_the_router_is_untouched(family):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    experts, n = adapter.num_experts(model.config), adapter.ffn_width(model.config)
    gate_up_name, down_name = (adapter.block_prefix(1) + spec.name for spec in adapter.tensors)
    gate_up = model.get_parameter(gate_up_name).detach().clone()  # (E, 2n, d)
    down = model.get_parameter(down_name).detach().clone()  # (E, d, n)
    router = {
        name: p.detach().clone() for name, p in model.named_parameters() if p.dim() == 2 and p.shape[0] == experts
    }
    assert router  # the router's (E, d) weight
    keeps = random_keeps(adapter.num_units(model.config), n, 40, seed=3)
    assert not torch.equal(keeps[experts], keeps[experts + 1])  # experts of one block keep different neurons

    slice_model_(model, adapter, keeps, progress=False)
    for e in range(experts):
        keep = keeps[experts + e]  # block 1, expert e
        sliced = model.get_parameter(gate_up_name)[e]
        assert torch.equal(sliced, torch.cat([gate_up[e, keep], gate_up[e, n + keep]]))
        assert torch.equal(model.get_parameter(down_name)[e], down[e][:, keep])
    assert adapter.ffn_width(model.config) == 40 and adapter.num_experts(model.config) == experts
    assert all(torch.equal(model.get_parameter(name), value) for name, value in router.items())


@pytest.mark.parametrize("ratio, k", [(0.25, 48), (0.1, 64), (0.5, 32), (0.95, 8)])
def test_the_kept_width_is_a_multiple_of_8(ratio, k, tmp_path):
    save_tiny_model("mixtral", tmp_path / "src")
    result = compress(model=str(tmp_path / "src"), out=tmp_path / "out", ratio=ratio, method="random", progress=False)
    assert result.k == k and read_manifest(tmp_path / "out")["k"] == k
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # the default grouped_mm
    with torch.no_grad():
        assert torch.isfinite(reloaded(torch.arange(3, 12)[None]).logits).all()


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3", "llama4", "llama4_text", "gpt_oss"])
def test_moe_families_with_several_widths_or_quantised_experts_are_refused_in_one_line(model_type):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(CONFIG_MAPPING[model_type]())
    assert str(err.value) == f"model type {model_type!r} cannot be pruned: {REFUSED[model_type]}"


def test_a_qwen3_moe_config_with_dense_blocks_is_refused():
    config = CONFIGS["qwen3_moe"]()
    config.mlp_only_layers = [0]
    with pytest.raises(UnsupportedModelError, match="mlp_only_layers"):
        get_adapter(config)


def routed_inputs(model, module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a fused experts module receives on a few random tokens: hidden states (T, d), the chosen experts
    (T, K) and their routing weights (T, K)."""
    recorded = []
    handle = module.register_forward_pre_hook(lambda m, args: recorded.append([a.detach() for a in args[:3]]))
    with torch.no_grad():
        model.base_model(input_ids=torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0)))
    handle.remove()
    return tuple(recorded[0])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_adapter_computes_each_experts_activations_as_the_stock_experts_module_does(family):
    """Read back through the stock forward: with expert e's out-projection set to pick d of its neurons (every
    other expert's zero), the experts module's output for a token routed to e is w_te * h_te[those neurons]."""
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    experts, n, d = (f(model.config) for f in (adapter.num_experts, adapter.ffn_width, adapter.hidden_size))
    module = out_module(model, adapter, 1)  # block 1's fused experts
    hidden, index, weights = routed_inputs(model, module)
    down = model.get_parameter(adapter.block_prefix(1) + adapter.out_projection.name)  # (E, d, n)
    assert down.shape == (experts, d, n)
    for e in range(experts):
        token, slot = torch.where(index == e)
        assert token.numel(), f"no token was routed to expert {e}"
        with torch.no_grad():
            got = adapter.expert_activations(module, e, hidden[token]) * weights[token, slot, None]  # (T_e, n)
            stock = torch.empty_like(got)
            for start in range(0, n, d):
                neurons = torch.arange(start, min(start + d, n))
                down.zero_()
                down[e, torch.arange(neurons.numel()), neurons] = 1.0
                stock[:, neurons] = module(hidden, index, weights)[token, : neurons.numel()]
        assert got.shape == (token.numel(), n)
        torch.testing.assert_close(got, stock, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_selfcal_scores_each_expert_on_the_tokens_routed_to_it(family):
    """Against a float64 reference from the experts' recorded inputs: expert e's neuron j scores
    sqrt(sum over its routed tokens t of (w_te * h_tej)^2) * ||down_e[:, j]||."""
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    experts, n = adapter.num_experts(model.config), adapter.ffn_width(model.config)
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    recorded = []
    modules = [out_module(model, adapter, i) for i in range(2)]
    handles = [
        m.register_forward_pre_hook(lambda m, args: recorded.append([a.detach() for a in args])) for m in modules
    ]
    with torch.no_grad():
        model.base_model(input_ids=ids)
    for h in handles:
        h.remove()
    expected = torch.zeros(2 * experts, n, dtype=torch.float64)
    for layer, (hidden, index, weights) in enumerate(recorded):
        gate_up, down = (p.detach().double() for p in (modules[layer].gate_up_proj, modules[layer].down_proj))
        for e in range(experts):
            sq = torch.zeros(n, dtype=torch.float64)
            for t in range(hidden.shape[0]):
                for slot in range(index.shape[1]):
                    if index[t, slot] == e:
                        x = hidden[t].double()
                        gate, up = gate_up[e, :n] @ x, gate_up[e, n:] @ x
                        h = torch.nn.functional.silu(gate) * up * weights[t, slot].double()
                        sq += h * h
            expected[layer * experts + e] = sq.sqrt() * down[e].norm(dim=0)

    stats = activation_stats(model, ids)
    routed = stats.tokens.squeeze(1)
    assert routed.sum() == 2 * ids.numel() * model.config.num_experts_per_tok  # every token reaches top-k experts
    got = neuron_scores(stats) * routed.clamp_min(1)[:, None].sqrt()  # the reference's sums are not averaged
    used = routed > 0
    torch.testing.assert_close(got[used], expected[used], rtol=1e-5, atol=1e-7)


def test_selfcal_compresses_a_mixture_of_experts(tmp_path):
    save_tiny_model("mixtral", tmp_path / "src")
    result = compress(model=str(tmp_path / "src"), out=tmp_path / "out", ratio=0.25, method="selfcal", progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert result.k == 48 and len(manifest["kept_indices"]) == 2 * 4  # one kept set per expert of each block
    assert len({tuple(keep) for keep in manifest["kept_indices"]}) == 8  # the experts chose differently
