"""Every adapter on a tiny random model: identity when all neurons are kept, exact pruning semantics
against an independent masked-dense reference, and a stock ``transformers`` reload of the saved result."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import CONFIGS, WIDTH, auto_class, sample_inputs, tiny_model

from prunenet import ops
from prunenet.adapters import REFUSED, SUPPORTED_MODEL_TYPES, UnsupportedModelError, get_adapter
from prunenet.cli import main
from prunenet.selectors import random_keeps
from prunenet.slicing import slice_model_

REQUIRED_TYPES = {
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
    "phi", "phi3", "opt", "falcon", "gpt2", "gpt_neox",
    "olmo2", "olmo3", "granite", "cohere", "cohere2", "smollm3", "ministral", "ministral3", "glm", "glm4",
    "starcoder2", "stablelm", "exaone4", "seed_oss", "ernie4_5", "apertus", "arcee", "hunyuan_v1_dense",
}  # fmt: skip


def random_keeps_of(model, fraction=0.6, seed=0):
    """Random kept neurons of every FFN unit (every layer, or every expert of every layer)."""
    adapter = get_adapter(model.config)
    n = adapter.ffn_width(model.config)
    return random_keeps(adapter.num_units(model.config), n, adapter.kept_width(1 - fraction, n), seed)


def masked_dense_logits(model, keeps, inputs):
    """Reference: zero the out-projection entries of dropped neurons in the *dense* model.

    A dropped neuron then contributes nothing, which is exactly what removing it means, so the
    pruned model must give the same logits (up to float32 summation order).
    """
    adapter = get_adapter(model.config)
    n, experts = adapter.ffn_width(model.config), adapter.num_experts(model.config)
    # The out-projection is the weight whose neuron axis differs from the first in-projection's.
    out_spec = next(s for s in adapter.tensors if not s.name.endswith(".bias") and s.axis != adapter.tensors[0].axis)
    saved = {}
    with torch.no_grad():
        for unit, keep in enumerate(keeps):
            layer, expert = divmod(unit, experts)
            drop = torch.ones(n, dtype=torch.bool)
            drop[keep] = False
            param = model.get_parameter(adapter.block_prefix(layer) + out_spec.name)
            saved.setdefault(param, param.detach().clone())
            target = param[expert] if out_spec.experts else param  # one expert of a fused (E, d, n) tensor
            target.index_fill_(out_spec.axis, drop.nonzero().squeeze(1), 0.0)
        logits = model(inputs).logits
        for param, value in saved.items():
            param.copy_(value)
    return logits


def test_every_required_model_type_is_supported():
    assert REQUIRED_TYPES <= set(SUPPORTED_MODEL_TYPES)
    assert {CONFIGS[name]().model_type for name in CONFIGS} >= REQUIRED_TYPES


def test_a_refused_family_is_refused_with_its_reason_in_one_line():
    assert not set(REFUSED) & set(SUPPORTED_MODEL_TYPES)
    for config in (transformers.Gemma3nTextConfig(), transformers.Gemma3nConfig()):
        with pytest.raises(UnsupportedModelError) as err:
            get_adapter(config)
        assert config.model_type in str(err.value) and "Gaussian cutoff" in str(err.value)
        assert "\n" not in str(err.value)


def test_the_cli_refuses_a_refused_family_with_exit_code_2(tmp_path, capsys):
    folder = tmp_path / "gemma3n"
    transformers.Gemma3nTextConfig(num_hidden_layers=2).save_pretrained(folder)
    assert main(["compress", "--model", str(folder), "--ratio", "0.2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gemma3n_text" in err and "Gaussian cutoff" in err
    assert not (tmp_path / "out").exists()


def test_unknown_model_type_names_the_supported_ones():
    config = transformers.BertConfig()
    with pytest.raises(UnsupportedModelError, match="bert") as err:
        get_adapter(config)
    for model_type in REQUIRED_TYPES:
        assert model_type in str(err.value)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_matrix_is_first_in_projection(name):
    model = tiny_model(name)
    adapter = get_adapter(model.config)
    n, d = adapter.ffn_width(model.config), adapter.hidden_size(model.config)
    unit = adapter.num_units(model.config) - 1  # the last expert (or the FFN) of block 1
    state = adapter.layer_state(model, unit)
    assert state.shape == (n, d)
    # The state rows are what the first in-projection multiplies the hidden state with.
    x = torch.randn(3, d)
    first = model.get_parameter(adapter.block_prefix(1) + adapter.tensors[0].name)
    if adapter.tensors[0].experts:
        first = first[-1]
    full = x @ first if adapter.tensors[0].axis == 1 else x @ first.t()
    torch.testing.assert_close(x @ state.t(), full[:, :n])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_keeping_every_neuron_is_the_identity(name):
    model = tiny_model(name)
    inputs = sample_inputs()
    with torch.no_grad():
        before = model(inputs).logits
    adapter = get_adapter(model.config)
    n = adapter.ffn_width(model.config)
    slice_model_(model, adapter, [torch.arange(n)] * adapter.num_units(model.config), progress=False)
    with torch.no_grad():
        after = model(inputs).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pruned_model_matches_masked_dense_and_reloads_with_stock_transformers(name, tmp_path):
    model = tiny_model(name)
    inputs = sample_inputs()
    keeps = random_keeps_of(model)
    k = keeps[0].numel()
    expected = masked_dense_logits(model, keeps, inputs)
    adapter = get_adapter(model.config)

    slice_model_(model, adapter, keeps, progress=False)
    assert adapter.ffn_width(model.config) == k
    with torch.no_grad():
        pruned = model(inputs).logits
    torch.testing.assert_close(pruned, expected, rtol=1e-4, atol=1e-5)

    model.save_pretrained(tmp_path)
    reloaded = auto_class(model.config).from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded) is type(model)
    assert get_adapter(reloaded.config).ffn_width(reloaded.config) == k
    with torch.no_grad():
        assert torch.equal(reloaded(inputs).logits, pruned)


@pytest.mark.skipif(not ops.available(), reason=f"prunenet._C not built: {ops.import_error()}")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_native_and_pytorch_slicing_give_identical_models(name):
    inputs = sample_inputs()
    native, reference = tiny_model(name), tiny_model(name)  # same seed: same weights
    keeps = random_keeps_of(native, fraction=0.45, seed=1)
    adapter = get_adapter(native.config)
    slice_model_(native, adapter, keeps, progress=False, backend="native")
    slice_model_(reference, adapter, keeps, progress=False, backend="torch")
    for (name_n, p_n), (name_r, p_r) in zip(native.named_parameters(), reference.named_parameters(), strict=True):
        assert name_n == name_r and torch.equal(p_n, p_r), name_n
    with torch.no_grad():
        assert torch.equal(native(inputs).logits, reference(inputs).logits)


def test_phi3_fused_gate_up_moves_rows_j_and_n_plus_j_together():
    model = tiny_model("phi3")
    adapter = get_adapter(model.config)
    fused = model.get_parameter("model.layers.0.mlp.gate_up_proj.weight").detach().clone()
    keeps = random_keeps_of(model)
    slice_model_(model, adapter, keeps, progress=False)
    sliced = model.get_parameter("model.layers.0.mlp.gate_up_proj.weight")
    keep = keeps[0]
    assert torch.equal(sliced, torch.cat([fused[keep], fused[WIDTH + keep]]))


def test_gpt2_conv1d_layout_and_null_n_inner():
    model = tiny_model("gpt2")
    assert model.config.n_inner is None
    adapter = get_adapter(model.config)
    assert adapter.ffn_width(model.config) == 4 * model.config.n_embd
    c_fc = model.get_parameter("transformer.h.0.mlp.c_fc.weight").detach().clone()  # (d, n)
    keeps = random_keeps_of(model)
    slice_model_(model, adapter, keeps, progress=False)
    assert model.config.n_inner == keeps[0].numel()
    assert torch.equal(model.get_parameter("transformer.h.0.mlp.c_fc.weight"), c_fc[:, keeps[0]])
    assert model.transformer.h[0].mlp.c_fc.nf == keeps[0].numel()


def shape_records(model) -> dict[str, tuple]:
    """What every module of ``model`` records about its weights' shapes, next to what the weights hold:
    ``nn.Linear``'s features, GPT-2 ``Conv1D``'s ``nf``, fused experts' ``intermediate_dim``."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            found[name] = ((module.out_features, module.in_features), tuple(module.weight.shape))
        elif hasattr(module, "nf") and hasattr(module, "weight"):
            found[name] = (module.nf, module.weight.shape[1])
        elif hasattr(module, "intermediate_dim") and hasattr(module, "down_proj"):
            down = module.down_proj if isinstance(module.down_proj, torch.Tensor) else module.down_proj.weight
            found[name] = (module.intermediate_dim, down.shape[-1])
    return found


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_modules_record_their_sliced_shapes(name):
    model = tiny_model(name)
    slice_model_(model, get_adapter(model.config), random_keeps_of(model), progress=False)
    records = shape_records(model)
    assert records  # the sweep saw the model's projections
    assert {module: pair for module, pair in records.items() if pair[0] != pair[1]} == {}


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda n, L: [torch.arange(n - 1, -1, -1)] * L, "sorted"),
        (lambda n, L: [torch.tensor([0, 0, 1])] * L, "sorted, unique"),
        (lambda n, L: [torch.tensor([1, n])] * L, r"in \[0"),
        (lambda n, L: [torch.arange(3)] * (L + 1), "layers"),
        (lambda n, L: [torch.arange(3, dtype=torch.int32)] * L, "int64"),
        (lambda n, L: [torch.arange(3), torch.arange(4)] + [torch.arange(3)] * (L - 2), "length"),
        (lambda n, L: [torch.arange(0)] * L, "zero"),
    ],
    ids=["unsorted", "duplicate", "out-of-range", "layer-count", "dtype", "ragged", "empty"],
)
def test_bad_kept_indices_are_rejected_before_any_change(bad, match):
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        slice_model_(model, adapter, bad(WIDTH, adapter.num_layers(model.config)), progress=False)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert model.config.intermediate_size == WIDTH
