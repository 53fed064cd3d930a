"""Pruned outputs load in serving engines (vLLM, SGLang): config.json says what the safetensors hold, in the
fields those engines read, for every family tried, pruned in memory and streamed.

Both engines read config.json through ``transformers.AutoConfig`` and build the model with their own classes,
which read these fields (public sources, by repository and path):

- FFN width and experts: vLLM ``vllm/model_executor/models/llama.py`` (``LlamaMLP(intermediate_size=
  config.intermediate_size)``; ``registry.py`` serves ``MistralForCausalLM`` with it too), ``mixtral.py``
  (``MixtralMoE(num_experts=config.num_local_experts, intermediate_size=config.intermediate_size)``),
  ``qwen3_moe.py`` (``FusedMoE(num_experts=config.num_experts, intermediate_size=config.moe_intermediate_size)``,
  ``config.intermediate_size`` for the dense layers of ``mlp_only_layers``), ``olmoe.py`` (``num_experts=
  config.num_experts, intermediate_size=config.intermediate_size``); SGLang ``python/sglang/srt/models/llama.py``
  and ``qwen3_moe.py``, the same fields.
- dtype: vLLM ``vllm/config/model.py`` ``_find_dtype`` (``config.dtype``, else the text config's; releases
  before transformers 4.56 read ``torch_dtype``); SGLang ``python/sglang/srt/configs/model_config.py``
  ``_get_and_verify_dtype`` (``dtype``, else ``torch_dtype``; none: float32, served in float16).
- quantization: vLLM ``vllm/config/model.py`` (``quantization_config``); SGLang ``model_config.py``
  ``_parse_quant_hf_config`` (``quantization_config``, ``compression_config``, a ``hf_quant_config.json`` file).
- ``architectures``: vLLM ``vllm/model_executor/models/registry.py`` picks the model class by its name.

The tensors' widths and dtypes are read from the safetensors headers with ``safetensors.safe_open``, not
through prunenet.
"""

from __future__ import annotations

import functools
import json
import re
import shutil

import pytest
import torch
import transformers
from running import compress_quietly
from safetensors import safe_open
from tiny_models import CONFIGS, save_tiny_model, tiny_model, tiny_tokenizer

from prunenet.checkpoint import declare_torch_dtype
from prunenet.model_errors import ModelLoadError

run = functools.partial(compress_quietly, ratio=0.3, method="magnitude")

# The neuron-indexed FFN tensors, as the hub checkpoints (and the engines' weight loaders) name them: in-projection
# rows (weights and biases) and out-projection columns hold one entry per neuron.
DENSE = (r"(^|\.)layers\.\d+\.mlp\.(gate_proj|up_proj)\.(weight|bias)$", r"(^|\.)layers\.\d+\.mlp\.down_proj\.weight$")
EXPERTS = (r"\.experts\.\d+\.(gate_proj|up_proj|w1|w3)\.weight$", r"\.experts\.\d+\.(down_proj|w2)\.weight$")
VISION = (r"(^|\.)vision_tower\..*\.mlp\.fc1\.(weight|bias)$", r"(^|\.)vision_tower\..*\.mlp\.fc2\.weight$")
FFN_LIKE = re.compile(r"\.(gate_proj|up_proj|down_proj|w1|w2|w3|fc1|fc2)\.weight$")

# family: (its architecture in vLLM's registry, [(width field's path in config.json, the tensors it sizes)],
# the config attribute the engine reads for the expert count, or None)
FAMILIES = {
    "llama": ("LlamaForCausalLM", [(("intermediate_size",), DENSE)], None),
    "qwen2": ("Qwen2ForCausalLM", [(("intermediate_size",), DENSE)], None),
    "qwen3": ("Qwen3ForCausalLM", [(("intermediate_size",), DENSE)], None),
    "mistral": ("MistralForCausalLM", [(("intermediate_size",), DENSE)], None),
    "gemma3_text": ("Gemma3ForCausalLM", [(("intermediate_size",), DENSE)], None),
    "mixtral": ("MixtralForCausalLM", [(("intermediate_size",), EXPERTS)], "num_local_experts"),
    # intermediate_size is the width of mlp_only_layers' dense MLPs: the tiny model has none, so it sizes nothing.
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        [(("moe_intermediate_size",), EXPERTS), (("intermediate_size",), DENSE)],
        "num_experts",
    ),
    "olmoe": ("OlmoeForCausalLM", [(("intermediate_size",), EXPERTS)], "num_experts"),
    # A wrapper: the language model's width in text_config; its vision tower keeps its own, unpruned.
    "gemma3": (
        "Gemma3ForConditionalGeneration",
        [(("text_config", "intermediate_size"), DENSE), (("vision_config", "intermediate_size"), VISION)],
        None,
    ),
}
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
QUANTIZATION_KEYS = ("quantization_config", "compression_config")


def headers(folder) -> dict[str, tuple[str, list[int]]]:
    """``{tensor name: (safetensors dtype, shape)}`` of every model shard in ``folder``, from the headers."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                out[name] = (tensor.get_dtype(), tensor.get_shape())
    return out


def field(config: dict, path: tuple[str, ...]):
    for key in path:
        config = config[key]
    return config


def check_serving_config(folder, family: str) -> dict:
    """Assert what the engines need of ``folder``'s config.json, against its tensors; returns the raw config."""
    raw = json.loads((folder / "config.json").read_text())
    loaded = transformers.AutoConfig.from_pretrained(folder)  # what the engines' model classes get
    tensors = headers(folder)
    architecture, widths, experts_attr = FAMILIES[family]

    # One width per kind: every tensor a width field sizes has that width on its neuron axis, every layer and
    # expert; every FFN tensor is sized by some field.
    covered = set()
    for path, (rows, cols) in widths:
        width = field(raw, path)
        assert isinstance(width, int) and width == field(loaded.to_dict(), path), path
        sized = {name: shape[0] for name, (_, shape) in tensors.items() if re.search(rows, name)}
        sized |= {name: shape[1] for name, (_, shape) in tensors.items() if re.search(cols, name)}
        assert set(sized.values()) <= {width}, f"{'.'.join(path)} = {width}, tensors: {sized}"
        covered |= sized.keys()
    assert {name for name in tensors if FFN_LIKE.search(name)} <= covered
    assert covered, "no FFN tensor found"
    if experts_attr is not None:  # as many experts per layer as the config says
        per_layer: dict[str, set[str]] = {}
        for name in tensors:
            if m := re.search(r"(.*layers\.\d+)\..*experts\.(\d+)\.", name):
                per_layer.setdefault(m.group(1), set()).add(m.group(2))
        assert per_layer and {len(e) for e in per_layer.values()} == {getattr(loaded, experts_attr)}

    # The dtype stated under both names, as the tensors hold it.
    stored = {SAFETENSORS_DTYPES[dtype] for dtype, _ in tensors.values() if dtype in SAFETENSORS_DTYPES}
    assert raw.get("dtype") is not None and raw.get("torch_dtype") == raw["dtype"], raw
    assert stored == {raw["dtype"]} and loaded.dtype == getattr(torch, raw["dtype"])

    # A float model: no quantization block or file; a registered architecture.
    assert not [key for key in QUANTIZATION_KEYS if key in raw] and not (folder / "hf_quant_config.json").exists()
    assert raw["architectures"] == [architecture]
    return raw


def save_source(family: str, folder, dtype: torch.dtype = torch.bfloat16):
    """A tiny model of ``family`` stored in ``dtype`` (hub checkpoints are mostly bfloat16), with a tokenizer."""
    tiny_model(family).to(dtype).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_config_is_what_serving_engines_read(family, streaming, tmp_path):
    save_source(family, tmp_path / "src")
    source = json.loads((tmp_path / "src" / "config.json").read_text())
    run(tmp_path / "src", tmp_path / "out", streaming=streaming)
    raw = check_serving_config(tmp_path / "out", family)
    assert raw["dtype"] == "bfloat16"
    for path, _ in FAMILIES[family][1]:  # pruned where the FFN is: each width field at most the source's
        assert field(raw, path) <= field(source, path)
    assert field(raw, FAMILIES[family][1][0][0]) < field(source, FAMILIES[family][1][0][0])


def _edit_config(folder, **fields):
    """Set (``None``: remove) top-level fields of ``folder``'s config.json."""
    config = json.loads((folder / "config.json").read_text())
    for key, value in fields.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


# A source's config that does not state its tensors' dtype (float32 here): none, another one, the old key only.
DTYPE_SOURCES = {
    "no-dtype": dict(dtype=None),
    "says-bfloat16": dict(dtype="bfloat16"),
    "torch_dtype-float16-only": dict(dtype=None, torch_dtype="float16"),
}


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
@pytest.mark.parametrize("case", DTYPE_SOURCES)
def test_pruned_config_states_the_stored_dtype_whatever_the_source_says(case, streaming, tmp_path):
    """A streamed output copies the tensors as stored: its config says their dtype, not the source's claim (SGLang
    serves a float16 for a config without one); in memory, ``--dtype auto`` loads them as stored."""
    save_tiny_model("llama", tmp_path / "src")
    _edit_config(tmp_path / "src", **DTYPE_SOURCES[case])
    run(tmp_path / "src", tmp_path / "out", streaming=streaming)
    assert check_serving_config(tmp_path / "out", "llama")["dtype"] == "float32"


def test_pruned_config_states_the_converted_dtype(tmp_path):
    """``--dtype fp16`` (in memory) writes float16 tensors, and the config says so."""
    save_tiny_model("llama", tmp_path / "src")
    run(tmp_path / "src", tmp_path / "out", streaming=False, dtype="fp16")
    assert check_serving_config(tmp_path / "out", "llama")["dtype"] == "float16"


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_stale_quantization_block_does_not_survive(streaming, tmp_path):
    """A float checkpoint whose folder still describes a quantization (a ``quantization_config`` block, the older
    ``compression_config`` key, SGLang's ``hf_quant_config.json``): a streamed output, and an in-memory one where
    transformers loads the source, is a float model with none of them. An in-memory load transformers refuses
    is refused in one line, writing nothing."""
    src = tmp_path / "src"
    save_tiny_model("llama", src)
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    _edit_config(src, quantization_config=fp8, compression_config={"quant_method": "compressed-tensors"})
    (src / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    try:
        run(src, tmp_path / "out", streaming=streaming, device="cpu")
    except ModelLoadError as err:  # transformers' quantizer refused the float weights (e.g. with a GPU present)
        assert not streaming and "\n" not in str(err) and not (tmp_path / "out").exists()
        return
    check_serving_config(tmp_path / "out", "llama")


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_torch_dtype_beside_dtype_reloads_the_same_config(family, tmp_path):
    """``torch_dtype`` written beside ``dtype`` changes nothing transformers reads, for every family."""
    config = CONFIGS[family]()
    config.dtype = torch.bfloat16
    config.save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    declare_torch_dtype(tmp_path / "b")
    raw = json.loads((tmp_path / "b" / "config.json").read_text())
    assert raw["torch_dtype"] == raw["dtype"] == "bfloat16"
    a, b = (transformers.AutoConfig.from_pretrained(tmp_path / x).to_dict() for x in "ab")
    assert {**a, "_name_or_path": ""} == {**b, "_name_or_path": ""}
