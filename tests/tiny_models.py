"""Tiny random-initialised configs, one per supported ``model_type`` (plus variants with MLP biases).

FFN widths are deliberately odd (not powers of two) so index arithmetic errors show.
"""

from __future__ import annotations

import torch
import transformers
from safetensors import safe_open

HIDDEN, WIDTH, LAYERS, HEADS, VOCAB = 32, 74, 2, 4, 128

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
_LLAMA_LIKE = dict(_COMMON, intermediate_size=WIDTH, num_key_value_heads=2, max_position_embeddings=64)
# Newer configs default to special-token ids of their real vocabularies (128000, 255001, ...): use ours.
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LLAMA_LIKE_TOKENS = dict(_LLAMA_LIKE, **_TOKENS)
MOE_WIDTH = 72
_VISION = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=28,
               patch_size=14)  # fmt: skip
_MOE = dict(_COMMON, **_TOKENS, num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_LLAMA_LIKE),
    "llama-mlp-bias": lambda: transformers.LlamaConfig(**_LLAMA_LIKE, mlp_bias=True),
    "mistral": lambda: transformers.MistralConfig(**_LLAMA_LIKE),
    "qwen2": lambda: transformers.Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: transformers.Qwen3Config(**_LLAMA_LIKE, head_dim=8),
    "gemma": lambda: transformers.GemmaConfig(**_LLAMA_LIKE, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(**_LLAMA_LIKE, head_dim=8, sliding_window=16),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**_LLAMA_LIKE, head_dim=8, sliding_window=16),
    "granite": lambda: transformers.GraniteConfig(
        **_LLAMA_LIKE_TOKENS, residual_multiplier=0.5, embedding_multiplier=2.0
    ),
    "smollm3": lambda: transformers.SmolLM3Config(**_LLAMA_LIKE_TOKENS, no_rope_layer_interval=2),
    "ministral": lambda: transformers.MinistralConfig(**_LLAMA_LIKE_TOKENS, head_dim=8),
    "ministral3": lambda: transformers.Ministral3Config(**_LLAMA_LIKE_TOKENS, head_dim=8),
    "seed_oss": lambda: transformers.SeedOssConfig(
        **_LLAMA_LIKE_TOKENS, head_dim=8, attention_bias=True, mlp_bias=True
    ),
    "ernie4_5": lambda: transformers.Ernie4_5Config(**_LLAMA_LIKE_TOKENS, head_dim=8, use_bias=True),
    "exaone4": lambda: transformers.Exaone4Config(**_LLAMA_LIKE_TOKENS, sliding_window=16),
    "hunyuan_v1_dense": lambda: transformers.HunYuanDenseV1Config(**_LLAMA_LIKE_TOKENS, head_dim=8),
    "olmo2": lambda: transformers.Olmo2Config(**_LLAMA_LIKE_TOKENS),
    "olmo3": lambda: transformers.Olmo3Config(**_LLAMA_LIKE_TOKENS, sliding_window=16),
    "cohere": lambda: transformers.CohereConfig(**_LLAMA_LIKE_TOKENS, use_qk_norm=True),
    "cohere2": lambda: transformers.Cohere2Config(**_LLAMA_LIKE_TOKENS, sliding_window=16),
    "stablelm": lambda: transformers.StableLmConfig(**_LLAMA_LIKE_TOKENS, qk_layernorm=True, use_qkv_bias=True),
    "glm": lambda: transformers.GlmConfig(**_LLAMA_LIKE_TOKENS, head_dim=8),
    "glm4": lambda: transformers.Glm4Config(**_LLAMA_LIKE_TOKENS, head_dim=8),
    "apertus": lambda: transformers.ApertusConfig(**_LLAMA_LIKE_TOKENS),
    "arcee": lambda: transformers.ArceeConfig(**_LLAMA_LIKE_TOKENS),
    "starcoder2": lambda: transformers.Starcoder2Config(**_LLAMA_LIKE_TOKENS),
    # Mixtures of experts: 4 experts, 2 per token. The expert width is a multiple of 8 (what the fused experts'
    # grouped matmul needs in bfloat16); an odd one would not run even before pruning.
    "mixtral": lambda: transformers.MixtralConfig(**_MOE, num_local_experts=4, intermediate_size=MOE_WIDTH),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_MOE, num_experts=4, moe_intermediate_size=MOE_WIDTH, head_dim=8
    ),
    "olmoe": lambda: transformers.OlmoeConfig(**_MOE, num_experts=4, intermediate_size=MOE_WIDTH),
    "granitemoe": lambda: transformers.GraniteMoeConfig(**_MOE, num_local_experts=4, intermediate_size=MOE_WIDTH),
    # Multimodal wrappers: a 1-layer vision tower beside the language model (only the latter is pruned).
    "gemma3": lambda: transformers.Gemma3Config(
        text_config=dict(_LLAMA_LIKE, head_dim=8, sliding_window=16), vision_config=_VISION, mm_tokens_per_image=4
    ),
    "mistral3": lambda: transformers.Mistral3Config(
        text_config=dict(_LLAMA_LIKE, head_dim=8, model_type="mistral"), vision_config=dict(_VISION, head_dim=8)
    ),
    "phi": lambda: transformers.PhiConfig(**_COMMON, intermediate_size=WIDTH, max_position_embeddings=64),
    "phi3": lambda: transformers.Phi3Config(
        **_COMMON, intermediate_size=WIDTH, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        ffn_dim=WIDTH,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=64,
    ),
    "falcon": lambda: transformers.FalconConfig(**_COMMON, ffn_hidden_size=WIDTH, bias=True),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
    "gpt2-n_inner": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=64,
        n_inner=WIDTH,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **_COMMON, intermediate_size=WIDTH, max_position_embeddings=64, bos_token_id=0, eos_token_id=0
    ),
}


def auto_class(config):
    """The Auto class of ``config``'s family (a wrapper's is ``AutoModelForImageTextToText``)."""
    from prunenet.adapters import auto_class_name

    return getattr(transformers, auto_class_name(config))


def tiny_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny model of family ``name`` in eval mode, float32, with random weights (biases randomised too)."""
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    model = auto_class(config).from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Default inits zero the biases; random ones catch a bias that is not sliced.
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def logits(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    """``model``'s logits on ``ids`` (default :func:`sample_inputs`), without gradients."""
    with torch.no_grad():
        return model(input_ids=sample_inputs() if ids is None else ids).logits


def spectral_ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """The reference of the spectral reward's statistic: scipy's two-sample KS between the float64 SVD
    singular values of ``a`` and of ``b``."""
    import numpy as np
    import scipy.stats

    sa = np.linalg.svd(a.double().numpy(), compute_uv=False)
    sb = np.linalg.svd(b.double().numpy(), compute_uv=False)
    return float(scipy.stats.ks_2samp(sa, sb).statistic)


def sample_inputs(batch: int = 2, length: int = 11, seed: int = 1) -> torch.Tensor:
    """Random token ids ``(batch, length)``."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over ``VOCAB`` made-up words (``w3`` ... ), whitespace-split; offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_text(words: int = 3000, seed: int = 0) -> str:
    """Text in the tiny tokenizer's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(3, VOCAB, (words,), generator=g).tolist())


def save_tiny_model(name: str, folder, seed: int = 0):
    """Save a tiny model of family ``name`` with the tiny tokenizer into ``folder``; returns the model."""
    model = tiny_model(name, seed)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def save_sharded(name: str, folder, shard_size: str = "20KB", seed: int = 0):
    """A tiny model of family ``name`` saved in several shards (with an index), plus a tokenizer."""
    model = tiny_model(name, seed)
    model.save_pretrained(folder, max_shard_size=shard_size)
    tiny_tokenizer().save_pretrained(folder)
    return model


def all_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of the model's ``*.safetensors`` files in ``folder`` (read with the safetensors library): not
    the policy's nor the neuron scores' file, which are no part of the model."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name in ("policy.safetensors", "scores.safetensors"):
            continue
        with safe_open(path, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def tiny_bpe_tokenizer(vocab_size: int = 320) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, what llama.cpp's ``gpt2`` tokenizer model reads) trained on
    :func:`tiny_text`: ``<s>``, ``</s>`` and ``<|endoftext|>`` (the token Qwen's tokenizer class adds when it is
    missing), the 256 byte tokens, then merges up to ``vocab_size`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|endoftext|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator([tiny_text(2000, seed) for seed in range(4)], trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<|endoftext|>"
    )
    assert len(tokenizer) == vocab_size, len(tokenizer)
    return tokenizer


def save_tiny_bpe_model(name: str, folder, seed: int = 0, vocab_size: int = 320):
    """A tiny model of family ``name`` with a ``vocab_size`` vocabulary and :func:`tiny_bpe_tokenizer`, saved in
    ``folder``; returns the model (what GGUF export needs: llama.cpp reads byte-level BPE tokenizers).

    Its weights are drawn 10x wider than the default (std 0.2): attention then depends clearly on positions and
    on the query-key products, so a wrong rotary layout or head order changes the logits by far more than
    float16 rounding."""
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    config.vocab_size = vocab_size
    config.initializer_range = 0.2
    tokenizer = tiny_bpe_tokenizer(vocab_size)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = auto_class(config).from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(".bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model
