"""Multimodal wrappers (Gemma 3, Mistral 3): only the language model's FFNs change; the vision tower, the
projector and the wrapper's own config fields stay as they were (the shared equivalences are in
test_adapters.py and test_streaming.py)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CONFIGS, WIDTH, auto_class, save_tiny_model, tiny_model

from prunenet import prune_
from prunenet.adapters import UnsupportedModelError, get_adapter
from prunenet.pipeline import compress


@pytest.mark.parametrize("family", ["gemma3", "mistral3"])
def test_only_the_language_model_is_pruned(family):
    model = tiny_model(family)
    language = get_adapter(model.config).layers_path + "."
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert any("vision_tower" in name for name in before)
    result = prune_(model, 0.25, method="random")
    for name, param in model.named_parameters():
        if name.startswith(language) and ".mlp." in name:
            assert param.shape != before[name].shape, name
        else:
            assert torch.equal(param, before[name]), name
    assert model.config.text_config.intermediate_size == result.k < WIDTH
    assert model.config.vision_config.intermediate_size == 24


def test_a_streamed_wrapper_reloads_with_its_own_auto_class(tmp_path):
    save_tiny_model("mistral3", tmp_path / "src")
    compress(model=str(tmp_path / "src"), out=tmp_path / "out", ratio=0.25, method="magnitude", streaming=True,
             progress=False)  # fmt: skip
    config = CONFIGS["mistral3"]()
    reloaded = auto_class(config).from_pretrained(tmp_path / "out")
    assert type(reloaded).__name__ == "Mistral3ForConditionalGeneration"
    assert reloaded.config.text_config.intermediate_size == 55


def test_a_mistral3_wrapper_around_another_language_model_is_refused():
    config = CONFIGS["mistral3"]()
    config.text_config.model_type = "phi3"
    with pytest.raises(UnsupportedModelError, match="'phi3', not a Llama-layout family"):
        get_adapter(config)
