"""The public Python API: prunenet.prune_ on a model in memory, prunenet.compress on a folder, the same errors
as the command line, and the README's example run as it is written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import WIDTH, sample_inputs, tiny_model

import prunenet
from prunenet.config import kept_width

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize("method", ["prunenet", "random", "magnitude", "selfcal"])
def test_prune_in_memory_equals_compress_of_the_same_model(tiny_dir, tmp_path, one_thread, method):
    policy = {"episodes": 2} if method == "prunenet" else {}
    prunenet.compress(tiny_dir, tmp_path / "out", 0.3, method=method, seed=4, progress=False, **policy)
    manifest = json.loads((tmp_path / "out" / "prunenet.json").read_text())
    model = tiny_model("llama")
    result = prunenet.prune_(model, 0.3, method=method, seed=4, **policy)
    assert [keep.tolist() for keep in result.keeps] == manifest["kept_indices"]
    assert result.k == kept_width(0.3, WIDTH) == model.config.intermediate_size  # in place, config too
    assert result.ffn_width == WIDTH and result.params_after == sum(p.numel() for p in model.parameters())
    assert {k: v for k, v in result.manifest().items()} == {k: manifest[k] for k in result.manifest()}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        ids = sample_inputs()
        torch.testing.assert_close(model(ids).logits, reloaded(ids).logits, rtol=0, atol=0)


def test_prune_raises_the_command_lines_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"--ratio must be in \[0, 1\)"):
        prunenet.prune_(model, 1.5)
    with pytest.raises(ValueError, match="unknown --method 'best'"):
        prunenet.prune_(model, 0.2, method="best")
    with pytest.raises(ValueError, match="--episodes must be at least 1"):
        prunenet.prune_(model, 0.2, episodes=0)
    with pytest.raises(ValueError, match="leaves no FFN neurons"):
        prunenet.prune_(model, 0.999)
    with pytest.raises(TypeError, match="unknown option"):
        prunenet.prune_(model, 0.2, epochs=3)
    assert model.config.intermediate_size == WIDTH  # nothing happened


def test_prune_with_a_config_object_and_overrides():
    config = prunenet.PruneConfig(ratio=0.5, method="random", seed=1)
    a = prunenet.prune_(tiny_model("llama"), config=config)
    b = prunenet.prune_(tiny_model("llama"), config=config, seed=2)
    assert a.config.seed == 1 and b.config.seed == 2 and a.keeps[0].tolist() != b.keeps[0].tolist()


def readme_python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert re.search(r"kept \d+ of 1536 FFN neurons", printed), printed
    for folder in ("pruned-selfcal", "pruned-prunenet"):
        config = transformers.AutoConfig.from_pretrained(tmp_path / folder)
        assert config.intermediate_size == kept_width(0.2, 1536)
