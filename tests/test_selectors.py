"""The selector registry and its methods: the CLI is built from the registry, every method is deterministic
with valid shapes on every family, what self-calibration's scores measure, stock reload, and (slow) that
self-calibration beats random selection on the embedded model."""

from __future__ import annotations

import copy
import json
import statistics

import pytest
import torch
import transformers
from tiny_models import LAYERS, WIDTH, tiny_model

from prunenet import probes as P
from prunenet import selfcal as S
from prunenet.activations import activation_stats, out_module
from prunenet.adapters import get_adapter
from prunenet.checkpoint import MANIFEST_FILE
from prunenet.cli import build_parser
from prunenet.config import PruneConfig, kept_width
from prunenet.pipeline import compress
from prunenet.selectors import SELECTORS, random_keeps, select
from prunenet.sources import ModelSource

FAMILIES = ["llama", "llama-mlp-bias", "phi3", "gpt2", "opt", "gpt_neox"]


# selfcal's generation is hundreds of tiny matmuls: on one thread (see conftest's one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def assert_valid_keeps(keeps, layers: int, k: int, width: int) -> None:
    assert len(keeps) == layers
    for keep in keeps:
        assert keep.dtype == torch.int64 and keep.device.type == "cpu" and keep.shape == (k,)
        assert torch.equal(keep, torch.unique(keep))  # sorted and unique
        assert 0 <= int(keep.min()) and int(keep.max()) < width


def test_the_cli_method_choices_are_the_registry():
    compress = next(a for a in build_parser()._subparsers._group_actions[0].choices["compress"]._actions
                    if a.dest == "method")  # fmt: skip
    assert compress.choices == list(SELECTORS)
    assert {"prunenet", "random", "magnitude", "selfcal"} <= set(SELECTORS)  # the paper's method, baselines, ours
    for selector in SELECTORS.values():
        assert f"'{selector.name}': {selector.summary}" in " ".join(compress.help.split())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(SELECTORS))
def test_every_selector_is_deterministic_with_valid_shapes(family, method):
    model = tiny_model(family)
    source = ModelSource(model)
    width = source.width  # 74, but GPT-2's default 4 * hidden = 128
    config = PruneConfig(ratio=0.3, method=method, seed=3, **({"episodes": 2} if method == "prunenet" else {}))
    first = select(source, config, progress=False).keeps
    assert_valid_keeps(first, LAYERS, kept_width(0.3, width), width)
    torch.manual_seed(12345)  # the global RNG must not matter
    again = select(source, config, progress=False).keeps
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_random_selection_is_uniform_over_neurons():
    """Each neuron is kept with probability k / n: over 400 draws of 30 of 60, every count is near 200."""
    counts = torch.zeros(60)
    for keep in random_keeps(400, 60, 30, seed=0):
        counts[keep] += 1
    assert counts.sum() == 400 * 30 and (counts - 200).abs().max() < 60  # ~6 standard deviations (sd 10)


def test_probes_are_seeded_and_start_from_bos():
    model = tiny_model("llama")
    a = P.self_probes(model, sequences=3, length=9, seed=1)
    assert a.shape == (3, 9) and a.dtype == torch.int64
    assert torch.equal(a[:, 0], torch.full((3,), P.start_token(model)))
    assert torch.equal(a, P.self_probes(model, sequences=3, length=9, seed=1))
    assert not torch.equal(a, P.self_probes(model, sequences=3, length=9, seed=2))
    r = P.self_probes(model, kind="random", sequences=2, length=5, seed=0)
    assert r.shape == (2, 5) and int(r.max()) < model.config.vocab_size


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_stats_and_wanda_score_match_a_direct_computation(family):
    """The hook reads each FFN's hidden activations h (B, T, n); the Wanda score is RMS(h_j) * ||W_out[:, j]||."""
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    ids = P.self_probes(model, kind="random", sequences=3, length=7, seed=0)
    stats = activation_stats(model, ids, batch_size=2)  # two batches: the sums must add up
    captured = []
    module = out_module(model, adapter, 1)
    handle = module.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    h = captured[0].reshape(-1, adapter.ffn_width(model.config)).double()
    assert (stats.tokens == ids.numel()).all()
    torch.testing.assert_close(stats.sum_sq[1], (h * h).sum(0), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(stats.variance()[1], h.var(0, unbiased=False), rtol=1e-4, atol=1e-8)
    out_cols = adapter.neuron_matrices(model, 1)[-1].double()  # (n, d): the out-projection's columns
    assert out_cols.shape == (adapter.ffn_width(model.config), adapter.hidden_size(model.config))
    # Neuron j's contribution to the FFN output over all tokens is h[:, j] outer W_out[:, j].
    expected = h.pow(2).mean(0).sqrt() * out_cols.norm(dim=1)
    torch.testing.assert_close(S.neuron_scores(stats, "wanda")[1], expected, rtol=1e-5, atol=1e-10)


def test_dropping_zero_score_neurons_leaves_the_output_unchanged():
    """A neuron whose out-projection column is zero scores 0 and is dropped first, changing nothing."""
    model = tiny_model("llama")
    dead = torch.tensor([3, 17, 40])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, dead] = 0
    keeps = S.selfcal_keeps(model, WIDTH - dead.numel(), seed=0, sequences=2, length=8)
    for keep in keeps:
        assert not torch.isin(dead, keep).any()


def test_top_k_protects_and_breaks_ties_by_index():
    scores = torch.tensor([5.0, 1.0, 1.0, 1.0, 0.0])
    assert S.top_k(scores, 2).tolist() == [0, 1]
    assert S.top_k(scores, 2, torch.tensor([4])).tolist() == [0, 4]


def test_compress_selfcal_reloads_with_stock_transformers_and_is_reproducible(tiny_dir, tmp_path):
    k = kept_width(0.25, WIDTH)
    manifests = []
    for out in ("a", "b"):
        # The kept columns as they are (compensation's refitted ones: tests/test_compensation.py).
        compress(model=str(tiny_dir), ratio=0.25, out=tmp_path / out, method="selfcal", seed=7, compensate=False,
                 progress=False)  # fmt: skip
        manifests.append(json.loads((tmp_path / out / MANIFEST_FILE).read_text()))
    assert manifests[0]["method"] == "selfcal" and manifests[0]["kept_indices"] == manifests[1]["kept_indices"]
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    assert pruned.config.intermediate_size == k
    dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    for layer, keep in enumerate(manifests[0]["kept_indices"]):
        torch.testing.assert_close(
            pruned.model.layers[layer].mlp.down_proj.weight, dense.model.layers[layer].mlp.down_proj.weight[:, keep]
        )
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=torch.tensor([[1, 5, 6, 7]])).logits).all()


@pytest.mark.slow
def test_selfcal_beats_the_median_random_selection_on_the_embedded_model():
    """At r = 0.1, on one held-out text (512 tokens): selfcal below the median of 5 random draws."""
    pytest.importorskip("gguf")
    from prunenet.models import load_model
    from prunenet.perplexity import perplexity
    from prunenet.slicing import slice_model_
    from prunenet.text import load_text

    model, tokenizer, _ = load_model("smollm2-135m")
    adapter = get_adapter(model.config)
    text = load_text(split="post1900")
    layers, width = adapter.num_layers(model.config), adapter.ffn_width(model.config)
    k = kept_width(0.1, width)

    def pruned_ppl(keeps):
        pruned = copy.deepcopy(model)
        slice_model_(pruned, adapter, keeps, progress=False)
        return perplexity(pruned, tokenizer, text, max_tokens=512, progress=False)["perplexity"]

    ours = pruned_ppl(S.selfcal_keeps(model, k, seed=0))
    random = [pruned_ppl(random_keeps(layers, width, k, seed=s)) for s in range(5)]
    assert ours < statistics.median(random), (ours, random)
