"""Attention slicing (``compress --modules ffn+attn``): whole key/value head groups removed, stock-reloadable.

References are independent of the slicing code: removing a KV group must give the same logits as the
*unsliced* model with that group's query heads silenced (their ``o_proj`` columns zeroed), and the saved
folder must reload with stock ``transformers`` into a model computing the same logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny_models import CONFIGS, logits, sample_inputs, save_tiny_model, spectral_ks, tiny_model

from prunenet.adapters import get_adapter
from prunenet.attention import (
    AttentionShape,
    choose_groups,
    slice_attention_,
    slice_attention_by_ratio_,
)
from prunenet.checkpoint import MANIFEST_FILE
from prunenet.cli import main
from prunenet.pipeline import compress

pytestmark = pytest.mark.usefixtures("one_thread")

# Every family whose adapter says attention can be sliced (qwen2 has q/k/v biases, qwen3 per-head q/k norms,
# gemma an explicit head_dim, glm partial rotary embeddings, starcoder2 biases everywhere).
FAMILIES = sorted(name for name, make in CONFIGS.items() if get_adapter(make()).attention is not None)


def silenced(model, adapter, removed: list[list[int]]):
    """The unsliced model with the query heads of ``removed[layer]`` groups contributing nothing (o_proj columns 0)."""
    heads, kv, hd = adapter.attention_shape(model.config)
    span = heads // kv * hd
    with torch.no_grad():
        for layer, groups in enumerate(removed):
            o = model.get_submodule(adapter.block_prefix(layer) + adapter.attention.o).weight
            for g in groups:
                o[:, g * span : (g + 1) * span] = 0
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_group_changes_nothing(family):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    before = logits(model)
    kv = adapter.attention_shape(model.config).kv_heads
    slice_attention_(model, adapter, [torch.arange(kv)] * adapter.num_layers(model.config), progress=False)
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_model_equals_silenced_heads_and_reloads_with_stock_transformers(family, tmp_path):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    heads, kv, hd = adapter.attention_shape(model.config)
    assert kv == 2  # tiny configs: 4 heads in 2 groups
    kept = [torch.tensor([1]), torch.tensor([0])]  # a different group per layer
    reference = logits(silenced(tiny_model(family), adapter, [[0], [1]]))

    slice_attention_(model, adapter, kept, progress=False)
    sliced = logits(model)
    torch.testing.assert_close(sliced, reference, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.num_attention_heads == heads // 2
    assert reloaded.config.num_key_value_heads == 1
    assert adapter.attention_shape(reloaded.config).head_dim == hd
    o = reloaded.get_submodule(adapter.block_prefix(0) + adapter.attention.o).weight
    assert o.shape == (model.config.hidden_size, heads // 2 * hd)
    torch.testing.assert_close(logits(reloaded), sliced, rtol=1e-5, atol=1e-5)


def test_sliced_model_generates_with_kv_cache():
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    slice_attention_(model, adapter, [torch.tensor([0])] * 2, progress=False)
    ids = sample_inputs(batch=1, length=5)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    # Greedy decoding with the cache must agree with recomputing the whole prefix each time.
    full = logits(model, out[:, :-1])
    assert torch.equal(full[0, ids.shape[1] - 1 :].argmax(-1), out[0, ids.shape[1] :])


def test_choose_groups_removing_one_group_is_the_exhaustive_optimum():
    g = torch.Generator().manual_seed(3)
    heads, kv, hd, d = 8, 4, 5, 48
    o = torch.randn(d, heads * hd, generator=g) * torch.linspace(0.2, 3, heads * hd)  # groups of unequal scale
    rows = o.t()
    span = heads // kv * hd
    scores = {}
    for removed in range(kv):
        keep = [r for r in range(heads * hd) if not removed * span <= r < (removed + 1) * span]
        scores[removed] = spectral_ks(rows, rows[keep])
    chosen = choose_groups(o, AttentionShape(heads, kv, hd), kv - 1).tolist()
    best = min(scores, key=lambda r: (scores[r], r))
    assert chosen == [x for x in range(kv) if x != best]


def test_choose_groups_returns_sorted_unique_groups_of_the_requested_count():
    o = torch.randn(32, 12 * 4)
    shape = AttentionShape(12, 6, 4)
    for keep in range(1, 7):
        chosen = choose_groups(o, shape, keep)
        assert chosen.numel() == keep and chosen.tolist() == sorted(set(chosen.tolist()))
        assert all(0 <= x < 6 for x in chosen.tolist())


@pytest.mark.parametrize("family", ["gemma3", "mistral3"])
def test_a_wrappers_attention_shape_is_its_language_models(family):
    """A multimodal wrapper keeps its heads in ``text_config``: the shape is read there, as for the model alone."""
    config = CONFIGS[family]()
    text = config.text_config
    assert get_adapter(config).attention_shape(config) == get_adapter(text).attention_shape(text) == (4, 2, 8)


def test_slice_by_ratio_keeps_the_same_count_in_every_layer():
    model = tiny_model("llama")
    info = slice_attention_by_ratio_(model, get_adapter(model.config), 0.5, progress=False)
    assert info["kv_heads_before"] == 2 and info["kv_heads_after"] == 1 and info["heads_after"] == 2
    assert all(len(groups) == 1 for groups in info["kept_groups"])
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1


def test_compress_ffn_attn_ratio_zero_is_identity_and_ratio_half_reloads(tiny_dir, tmp_path):
    dense = tiny_model("llama")  # the model tiny_dir holds
    out0 = tmp_path / "out0"
    compress(model=str(tiny_dir), out=out0, ratio=0.0, method="random", modules="ffn+attn", progress=False)
    same = transformers.AutoModelForCausalLM.from_pretrained(out0, dtype=torch.float32)
    assert torch.equal(logits(same), logits(dense))

    out = tmp_path / "out"
    compress(model=str(tiny_dir), out=out, ratio=0.5, method="random", modules="ffn+attn", progress=False)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["modules"] == "ffn+attn"
    assert manifest["attention"]["kv_heads_after"] == 1 and len(manifest["attention"]["kept_groups"]) == 2
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert pruned.config.num_key_value_heads == 1 and pruned.config.num_attention_heads == 2
    assert torch.isfinite(logits(pruned)).all()


@pytest.mark.parametrize("family", ["phi3", "opt", "gpt2"])
def test_unsupported_families_are_refused_in_one_line(family, tmp_path, capsys):
    src = tmp_path / "src"
    save_tiny_model(family, src)
    capsys.readouterr()  # drop the save's progress output
    out = tmp_path / "out"
    code = main(["compress", "--model", str(src), "--ratio", "0.2", "--out", str(out), "--modules", "ffn+attn",
                 "--method", "random", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--modules ffn+attn is not supported" in err[0]
    assert not out.exists()


def test_groups_are_validated():
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    for bad in ([torch.tensor([0, 0])] * 2, [torch.tensor([2])] * 2, [torch.tensor([0]), torch.tensor([0, 1])]):
        with pytest.raises(ValueError):
            slice_attention_(model, adapter, bad, progress=False)
