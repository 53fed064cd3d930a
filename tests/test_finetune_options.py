"""The finetune command's options: one self-distillation recipe for ``compress --recover`` and the defaults of
``finetune --teacher``, explicit values over it, and plain ``finetune``'s defaults as they were."""

from __future__ import annotations

import dataclasses

import pytest

from prunenet.cli import build_parser, finetune_run_of
from prunenet.config import SELF_DISTILLATION, CompressConfig, FinetuneConfig, FinetuneError, FinetuneRun

BASE = ["finetune", "--model", "pruned", "--out", "out"]

# Plain fine-tuning's defaults, as the CLI has always had them.
PLAIN = dict(steps=300, lora_r=8, lr=2e-4, seq_len=256, batch_size=4, eval_every=25, holdout_tokens=4096,
             teacher_tokens=32768)  # fmt: skip


def run_of(*flags: str) -> FinetuneRun:
    return finetune_run_of(build_parser().parse_args([*BASE, *flags]))


def test_finetune_teacher_without_flags_is_compress_recovers_recipe():
    recover = CompressConfig(ratio=0.2).recovery_config()
    assert run_of("--teacher", "dense").config == recover
    assert FinetuneRun(teacher="dense").config == recover  # the Python API's default for a teacher
    assert {name: getattr(recover, name) for name in SELF_DISTILLATION} == dict(SELF_DISTILLATION)
    defaults = CompressConfig(ratio=0.2)
    assert (defaults.recover_steps, defaults.recover_tokens) == (SELF_DISTILLATION["steps"],
                                                                 SELF_DISTILLATION["teacher_tokens"])  # fmt: skip


def test_explicit_flags_win_over_the_recipe():
    cfg = run_of("--teacher", "dense", "--steps", "300", "--lr", "2e-4", "--seq-len", "64", "--patience", "7").config
    assert (cfg.steps, cfg.lr, cfg.seq_len, cfg.patience) == (300, 2e-4, 64, 7)
    assert cfg.lora_r == SELF_DISTILLATION["lora_r"] and cfg.teacher_tokens == SELF_DISTILLATION["teacher_tokens"]


def test_plain_finetune_keeps_its_defaults():
    run = run_of()
    assert run.config == FinetuneConfig()
    assert {name: getattr(run.config, name) for name in PLAIN} == PLAIN
    assert run_of("--steps", "12").config == dataclasses.replace(FinetuneConfig(), steps=12)
    assert (run.text_file, run.teacher, run.eval_tokens, run.device, run.dtype, run.overwrite) == (
        None, None, 2048, "auto", "fp32", False)  # fmt: skip


def test_help_shows_both_defaults_and_recover_states_the_recipe():
    sub = build_parser()._subparsers._group_actions[0].choices
    text = " ".join(sub["finetune"].format_help().split())
    assert "(default: 300; with --teacher: 190)" in text
    assert "LoRA rank (default: 8; with --teacher: 16)" in text
    assert "windows per micro-batch (default: 4)" in text  # the same either way: one default shown
    assert "{fp32,fp16,bf16}" in text
    compress = " ".join(sub["compress"].format_help().split())
    assert "LoRA (rank 16, lr 1e-3, batches of 4x128 tokens)" in compress and "(the last 1024 held out)" in compress


def test_the_python_api_takes_the_recipe_with_a_teacher_unless_given_a_config(tmp_path):
    """Checked before any model is looked for: the recipe's 128-token sequences, or the given config's 256."""
    from prunenet.finetune import finetune

    common = dict(model=str(tmp_path / "nowhere"), out=tmp_path / "o", teacher=str(tmp_path / "dense"))
    with pytest.raises(FinetuneError, match="fewer than two 128-token sequences"):
        finetune(**common, teacher_tokens=200)
    with pytest.raises(FinetuneError, match="fewer than two 256-token sequences"):
        finetune(**common, config=FinetuneConfig(teacher_tokens=300))
    with pytest.raises(TypeError, match="unknown option"):
        finetune(**common, stepz=3)


@pytest.mark.parametrize(
    "run, message",
    [
        (FinetuneRun(dtype="fp8"), "unknown --dtype 'fp8'; choose one of fp32, fp16, bf16"),
        (FinetuneRun(eval_tokens=-1), "--eval-tokens must be at least 0"),
        (FinetuneRun(teacher="d", text_file="t.txt"), "--teacher and --text-file exclude each other"),
        (FinetuneRun(config=FinetuneConfig(steps=0)), "--steps must be at least 1"),
    ],
    ids=["dtype", "eval-tokens", "teacher-and-text", "hyper-parameter"],
)
def test_the_run_is_validated_naming_the_flag(run, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        run.validate()
