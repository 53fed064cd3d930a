"""Write a random-weight, correctly named and sharded safetensors checkpoint of an LLM shape.

No network: the tensor names and shapes come from instantiating the model class on the ``meta``
device from a config, named as ``save_pretrained`` stores them (a mixture of experts' fused experts one
tensor per expert), the weights are seeded Gaussians written one tensor at a time (peak memory: one
tensor), and shards are cut at ``--shard-size`` like ``save_pretrained``'s, with an index.

    python benchmarks/make_checkpoint.py --shape llama2-7b --dtype fp16 --out /tmp/llama2-7b
    python benchmarks/make_checkpoint.py --shape tiny --out /tmp/tiny   # seconds, for tests
    python benchmarks/make_checkpoint.py --shape llama2-7b --layers 4 --out /tmp/7b-4  # 2 GiB, 7B-shaped layers

Shapes: LLaMA-2 7B / 13B / 70B (70B has grouped-query attention, 8 KV heads), SmolLM2-135M's (the
embedded model's shape, untied head), ``tiny``, and the mixtures of experts Mixtral-8x7B (8 experts of
width 14336) and Qwen3-30B-A3B (128 experts of width 768, 8 per token). ``--layers N`` keeps only the first N decoder
blocks: every tensor keeps its shape, so a run on it costs what N layers of the full model cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from prunenet.safetensors_io import StreamingWriter, TensorSpec
from prunenet.streaming import INDEX_FILE
from prunenet.validate import parse_size

LLAMA = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
SHAPES = {  # name: (config class, its keyword arguments)
    "tiny": ("LlamaConfig", dict(LLAMA, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                 num_attention_heads=4, vocab_size=256)),
    "llama2-7b": ("LlamaConfig", dict(LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32)),
    "llama2-13b": ("LlamaConfig", dict(LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                       num_attention_heads=40)),
    "smollm2-135m": ("LlamaConfig", dict(LLAMA, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)),
    "llama2-70b": ("LlamaConfig", dict(LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                       num_attention_heads=64, num_key_value_heads=8)),
    "mixtral-8x7b": ("MixtralConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                           num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                           num_experts_per_tok=2, vocab_size=32000)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                                             num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                             head_dim=128, num_experts=128, num_experts_per_tok=8,
                                             vocab_size=151936)),
}  # fmt: skip
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def shape_config(shape: str, dtype: torch.dtype, layers: int | None = None) -> transformers.PretrainedConfig:
    """The config of a shape (LLaMA-2's: vocabulary 32000, RMSNorm eps 1e-5), untied head, with only its first
    ``layers`` decoder blocks if given."""
    class_name, kwargs = SHAPES[shape]
    kwargs = dict(kwargs)
    if layers is not None:
        if not 1 <= layers <= kwargs["num_hidden_layers"]:
            raise ValueError(f"layers must be in 1..{kwargs['num_hidden_layers']} for {shape}, not {layers}")
        kwargs["num_hidden_layers"] = layers
    config = getattr(transformers, class_name)(**kwargs, tie_word_embeddings=False)
    config.dtype = dtype
    config.architectures = [class_name.removesuffix("Config") + "ForCausalLM"]
    return config


def tensor_specs(config, dtype: torch.dtype) -> list[TensorSpec]:
    """Names and shapes of the model's state dict as ``save_pretrained`` stores it, from a meta-device model:
    ``transformers``' own reverse conversion splits fused experts into one tensor per expert."""
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    stored = revert_weight_conversion(model, state)
    if stored.keys() == state.keys():  # nothing converted: keep the state dict's order
        stored = state
    return [TensorSpec(name, dtype, tuple(t.shape)) for name, t in stored.items()]


def random_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """Norm weights are ones; every other tensor is N(0, 0.02^2), seeded by ``seed`` and the name."""
    if spec.name.endswith("norm.weight"):
        return torch.ones(spec.shape, dtype=spec.dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    return (torch.randn(spec.shape, generator=g) * 0.02).to(spec.dtype)


def word_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over ``vocab_size`` made-up words (``w3``, ``w4``, ...): offline, so that the
    checkpoint is a complete model folder (``from_pretrained`` of the tokenizer works)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def shard(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of tensors of at most ``max_bytes`` each (a bigger tensor gets its own)."""
    groups, size = [[]], 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    return groups


def make_checkpoint(
    shape: str, out: Path, dtype: str = "fp16", shard_size: str = "5GB", seed: int = 0, layers: int | None = None
) -> Path:
    """Write the checkpoint to ``out`` atomically (a temporary sibling renamed at the end); ``layers``: only
    the first that many decoder blocks (default: all)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it first")
    config = shape_config(shape, DTYPES[dtype], layers)
    specs = tensor_specs(config, DTYPES[dtype])
    groups = shard(specs, parse_size(shard_size))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        config.save_pretrained(tmp)
        word_tokenizer(config.vocab_size).save_pretrained(tmp)
        weight_map = {}
        total = sum(s.nbytes for s in specs)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {shape}") as bar:
            for i, group in enumerate(groups):
                name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors"
                with StreamingWriter(tmp / name, group, {"format": "pt"}) as writer:
                    for spec in group:
                        writer.write(spec.name, random_tensor(spec, seed))
                        weight_map[spec.name] = name
                        bar.update(spec.nbytes)
        if len(groups) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True, help="model shape")
    parser.add_argument("--out", required=True, help="folder to create (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="weight dtype")
    parser.add_argument("--shard-size", default="5GB", help="largest shard, e.g. 5GB or 2GiB")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--layers", type=int, help="only the first N decoder blocks (default: all of the shape's)")
    args = parser.parse_args(argv)
    most = SHAPES[args.shape][1]["num_hidden_layers"]
    if args.layers is not None and not 1 <= args.layers <= most:
        parser.error(f"--layers must be in 1..{most} for {args.shape}")
    start = time.perf_counter()
    out = make_checkpoint(args.shape, Path(args.out), args.dtype, args.shard_size, args.seed, args.layers)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
