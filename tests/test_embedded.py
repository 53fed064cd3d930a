"""Acceptance on the real embedded model (SmolLM2-135M): compress at ratio 0.3, reload with stock
transformers, and 100 training episodes without a NaN."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from prunenet.adapters import get_adapter
from prunenet.checkpoint import MANIFEST_FILE
from prunenet.models import load_model
from prunenet.pipeline import compress
from prunenet.slicing import slice_model_
from prunenet.train import TrainConfig, train_policy

pytestmark = pytest.mark.slow

PROMPT = "The state of the union is strong, and our economy"


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded") / "r03"
    result = compress(model="smollm2-135m", ratio=0.3, out=out, method="prunenet", episodes=20, progress=False)
    assert result.k == 1075 and result.ffn_width == 1536
    return out


def test_pruned_embedded_model_reloads_with_stock_transformers_and_same_logits(pruned_dir):
    manifest = json.loads((pruned_dir / MANIFEST_FILE).read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(pruned_dir)
    assert reloaded.config.intermediate_size == 1075
    assert all(layer.mlp.gate_proj.weight.shape == (1075, 576) for layer in reloaded.model.layers)

    # The same pruning applied in memory from the manifest's indices gives bit-identical logits.
    model, _, _ = load_model("smollm2-135m")
    keeps = [torch.tensor(k) for k in manifest["kept_indices"]]
    slice_model_(model, get_adapter(model.config), keeps, progress=False)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)


def test_one_hundred_episodes_stay_finite():
    model, _, _ = load_model("smollm2-135m")
    adapter = get_adapter(model.config)
    states = [adapter.layer_state(model, i) for i in range(adapter.num_layers(model.config))]
    result = train_policy(states, 1075, TrainConfig(episodes=100, kl_weight=0.1), progress=False)
    assert len(result.episode_rewards) == 100
    assert all(math.isfinite(r) for r in result.episode_rewards)
    assert all(torch.isfinite(p).all() for p in result.policy.parameters())
    with torch.no_grad():
        assert all(torch.isfinite(result.policy.logits(w)).all() for w in states)
