"""Self-distillation recovery: the KL losses against float64 references, targets computed once, a run
that lowers the held-out KL, determinism, stock reload, and nothing written outside ``--out``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from tiny_models import all_tensors, save_tiny_model, tiny_model, tiny_tokenizer

from prunenet.checkpoint import read_manifest
from prunenet.cli import main
from prunenet.config import FinetuneConfig, FinetuneError
from prunenet.distill import full_kl, teacher_targets, topk_kl
from prunenet.finetune import finetune
from prunenet.pipeline import compress
from prunenet.recovery_training import distill_lora

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

# Small and aggressive, so a few steps of a tiny model visibly move the adapters.
TINY = dict(steps=6, seq_len=16, batch_size=2, lr=1e-2, warmup_steps=0, eval_every=3, holdout_tokens=32, patience=5,
            teacher_tokens=160, top_k=8)  # fmt: skip


def reference_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``mean(sum p log(p/q))`` in float64, 0 log 0 = 0."""
    p, q = p.double(), q.double()
    terms = torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p))
    return terms.sum(-1).mean()


@pytest.mark.parametrize("k", [1, 5, 31])
def test_topk_kl_is_the_kl_of_the_bucketed_distributions(k):
    """Against a float64 computation that builds the K + 1 bucket distributions explicitly."""
    gen = torch.Generator().manual_seed(k)
    teacher, student = torch.randn(3, 7, 32, generator=gen) * 3, torch.randn(3, 7, 32, generator=gen) * 3
    log_p = torch.log_softmax(teacher, -1)
    logp, index = log_p.topk(k, -1)
    rest = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, index, False)
    tail = torch.logsumexp(log_p.masked_fill(~rest, float("-inf")), -1)
    p, q = log_p.double().exp(), torch.softmax(student.double(), -1)
    p_buckets = torch.cat([p.gather(-1, index), (p * rest).sum(-1, keepdim=True)], -1)
    q_buckets = torch.cat([q.gather(-1, index), (q * rest).sum(-1, keepdim=True)], -1)
    got = topk_kl(student, logp, index.int(), tail)
    torch.testing.assert_close(got.double(), reference_kl(p_buckets, q_buckets), rtol=1e-5, atol=1e-6)
    assert got <= full_kl(student, teacher) + 1e-6  # coarsening never increases a KL


def test_full_kl_and_topk_kl_over_the_whole_vocabulary_agree_with_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 16, generator=gen) * 2, torch.randn(2, 5, 16, generator=gen) * 2
    want = reference_kl(torch.softmax(teacher.double(), -1), torch.softmax(student.double(), -1))
    torch.testing.assert_close(full_kl(student, teacher).double(), want, rtol=1e-5, atol=1e-6)
    logp, index = torch.log_softmax(teacher, -1).topk(16, -1)  # K = V: no tail
    tail = torch.full(logp.shape[:-1], float("-inf"))
    torch.testing.assert_close(topk_kl(student, logp, index.int(), tail).double(), want, rtol=1e-5, atol=1e-6)
    assert float(full_kl(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_teacher_targets_are_the_teachers_top_k_on_its_own_text():
    teacher = tiny_model("llama").eval()
    targets = teacher_targets(teacher, sequences=3, length=12, top_k=4, seed=5)
    assert targets.ids.shape == (3, 12) and targets.logp.shape == targets.index.shape == (3, 12, 4)
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(input_ids=targets.ids).logits.double(), -1)
    torch.testing.assert_close(targets.logp.double(), log_p.gather(-1, targets.index.long()), rtol=1e-5, atol=1e-5)
    assert torch.equal(targets.index.long(), log_p.topk(4, -1).indices)
    tail = (1 - targets.logp.double().exp().sum(-1)).log()
    torch.testing.assert_close(targets.tail.double(), tail, rtol=1e-4, atol=1e-5)
    again = teacher_targets(teacher, sequences=3, length=12, top_k=4, seed=5)
    assert torch.equal(again.ids, targets.ids) and torch.equal(again.logp, targets.logp)
    assert not torch.equal(teacher_targets(teacher, sequences=3, length=12, top_k=4, seed=6).ids, targets.ids)


def test_training_reuses_the_targets_and_never_runs_the_teacher_again():
    """The teacher runs only while the targets are made; training and early stopping read the stored ones, and
    lower the held-out KL of a student that starts away from the teacher."""
    teacher, calls = tiny_model("llama").eval(), []
    teacher.register_forward_pre_hook(lambda *_: calls.append(1))
    cfg = FinetuneConfig(**TINY)
    targets = teacher_targets(teacher, sequences=10, length=16, top_k=8, seed=0)
    made = len(calls)
    peft_model, info = distill_lora(tiny_model("llama", seed=1), targets, cfg, teacher=teacher, progress=False)
    assert len(calls) == made > 0
    assert info["holdout_sequences"] == 2 and info["train_sequences"] == 8
    assert info["best_val_loss"] < info["val_loss_before"]


def test_full_vocabulary_distillation_runs_the_resident_teacher_and_lowers_the_kl():
    teacher = tiny_model("llama").eval()
    cfg = FinetuneConfig(**{**TINY, "top_k": 0})
    targets = teacher_targets(teacher, sequences=10, length=16, top_k=0, seed=0)
    assert targets.logp.numel() == 0
    with pytest.raises(ValueError, match="needs the teacher"):
        distill_lora(tiny_model("llama", seed=1), targets, cfg, progress=False)
    _, info = distill_lora(tiny_model("llama", seed=1), targets, cfg, teacher=teacher, progress=False)
    assert info["best_val_loss"] < info["val_loss_before"]


def pruned_and_dense(tmp_path):
    """A dense teacher and a pruned student made from another random model of the family: a tiny random
    model pruned from the teacher itself would predict what the teacher does (near-uniform) already."""
    dense, other = tmp_path / "dense", tmp_path / "other-dense"
    save_tiny_model("llama", dense)
    save_tiny_model("llama", other, seed=1)
    compress(model=str(other), out=tmp_path / "pruned", ratio=0.5, method="random", progress=False)
    shutil.rmtree(other)
    return dense, tmp_path / "pruned"


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_distillation_writes_a_stock_loadable_model_deterministically_and_only_into_out(tmp_path, capsys):
    dense, pruned = pruned_and_dense(tmp_path)
    before = {name: snapshot(tmp_path / name) for name in ("dense", "pruned")}
    flags = ["--steps", "4", "--seq-len", "16", "--batch-size", "2", "--lr", "1e-2", "--holdout-tokens", "32",
             "--teacher-tokens", "160", "--kd-top-k", "8", "--warmup-steps", "0", "--eval-every", "2",
             "--eval-tokens", "0", "--json", "--quiet"]  # fmt: skip
    for out in ("a", "b"):
        assert main(["finetune", "--model", str(pruned), "--teacher", str(dense), "--out", str(tmp_path / out),
                     *flags]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps_run"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "dense", "pruned"]
    assert {name: snapshot(tmp_path / name) for name in ("dense", "pruned")} == before
    a, b = all_tensors(tmp_path / "a"), all_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # same seed, same model
    assert any(not torch.equal(a[n], t) for n, t in all_tensors(pruned).items())  # training changed it
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert reloaded.config.intermediate_size == transformers.AutoConfig.from_pretrained(pruned).intermediate_size
    text = read_manifest(tmp_path / "a")["finetune"]["text"]
    assert text["source"] == "generated by the teacher (no dataset)" and text["teacher"] == str(dense)
    assert (text["sequences"], text["length"], text["tokens"], text["top_k"], text["seed"]) == (10, 16, 160, 8, 0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--text-file", "t.txt"], "--teacher and --text-file exclude each other"),
        (["--teacher-tokens", "16"], "fewer than two 16-token sequences"),
        (["--kd-top-k", "-1"], "--kd-top-k must be at least 0"),
        (["--hard-label-weight", "nan"], "--hard-label-weight"),
    ],
    ids=["text-file", "too-few-tokens", "top-k", "hard-label-weight"],
)
def test_bad_distillation_settings_are_one_line_errors_before_any_work(extra, message, tmp_path, capsys):
    dense, pruned = pruned_and_dense(tmp_path)
    args = ["finetune", "--model", str(pruned), "--teacher", str(dense), "--out", str(tmp_path / "o"),
            "--seq-len", "16", *extra]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
    dense, pruned = pruned_and_dense(tmp_path)
    other = tmp_path / "other-vocabulary"
    config = transformers.AutoConfig.from_pretrained(dense)
    config.vocab_size = config.vocab_size + 8
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    with pytest.raises(FinetuneError, match="vocabulary"):
        finetune(model=str(pruned), teacher=str(other), out=tmp_path / "o", eval_tokens=0, progress=False,
                 config=FinetuneConfig(**TINY))  # fmt: skip
    assert not (tmp_path / "o").exists()


RECOVER = ["--recover-steps", "40", "--recover-tokens", "2048"]  # past the warm-up; 16 sequences of 128 tokens


def peaked_teacher(folder):
    """A tiny random llama with its LM head scaled up: a peaked next-token distribution. A random tiny model's
    is near uniform, so a student pruned from it would match it already and recovery would not move."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def compress_args(dense, out, *extra):
    return ["compress", "--model", str(dense), "--out", str(out), "--ratio", "0.5", "--method", "random", "--quiet",
            *extra]  # fmt: skip


def test_compress_recover_equals_compress_then_finetune_with_the_teacher(tmp_path, capsys):
    """``compress --recover`` is the two commands in one: the same tensors bit for bit, nothing left beside
    ``--out`` (no staging folder), the source untouched, and a stock reload at the pruned width."""
    dense = peaked_teacher(tmp_path / "dense")
    before = snapshot(dense)
    assert main(compress_args(dense, tmp_path / "recovered", "--recover", *RECOVER, "--json")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["recover_steps_run"] == 40 and summary["recover_best_step"] > 0
    assert main(compress_args(dense, tmp_path / "pruned")) == 0
    # The budget of RECOVER; the rest is finetune --teacher's defaults: the recipe --recover trains with.
    budget = ["--steps", "40", "--teacher-tokens", "2048", "--eval-tokens", "0", "--quiet"]
    assert main(["finetune", "--model", str(tmp_path / "pruned"), "--teacher", str(dense), "--out",
                 str(tmp_path / "two-commands"), *budget]) == 0  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "pruned", "recovered", "two-commands"]
    assert snapshot(dense) == before
    a, b = all_tensors(tmp_path / "recovered"), all_tensors(tmp_path / "two-commands")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], t) for n, t in all_tensors(tmp_path / "pruned").items())  # recovery trained
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "recovered")
    assert (
        reloaded.config.intermediate_size
        == transformers.AutoConfig.from_pretrained(tmp_path / "pruned").intermediate_size
    )
    manifest = read_manifest(tmp_path / "recovered")
    assert manifest["kept_indices"] == read_manifest(tmp_path / "pruned")["kept_indices"]
    recovery = manifest["finetune"]
    assert recovery["source_path"] is None  # the staging folder it was read from is gone
    assert recovery["text"]["teacher"] == str(dense)
    assert (recovery["text"]["sequences"], recovery["text"]["length"]) == (16, 64)  # capped at the tiny context
    assert recovery["steps_run"] == 40


@pytest.mark.parametrize("failure", [RuntimeError("recovery failed"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_failed_recovery_leaves_no_output_and_no_staging_folder(failure, tiny_dir, tmp_path, monkeypatch):

    def fail(*args, **kwargs):
        assert any(p.name.startswith(".out.stage-") for p in tmp_path.iterdir())  # the pruned model is staged
        raise failure

    monkeypatch.setattr("prunenet.finetune.distill_lora", fail)
    with pytest.raises(type(failure)):
        compress(model=str(tiny_dir), out=tmp_path / "out", ratio=0.5, method="random", recover=True,
                 recover_steps=2, recover_tokens=512, progress=False)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [tiny_dir.name]


def test_the_next_run_removes_a_killed_runs_staging_folder_but_nothing_unmarked(tiny_dir, tmp_path):
    from prunenet.checkpoint import PARTIAL_MARKER

    killed, foreign = tmp_path / ".out.stage-0badc0de", tmp_path / ".out.stage-users"
    (killed / "pruned").mkdir(parents=True)
    (killed / PARTIAL_MARKER).touch()
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not prunenet's")
    assert main(compress_args(tiny_dir, tmp_path / "out", "--recover", *RECOVER)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.stage-users", tiny_dir.name, "out"])
    assert (foreign / "notes.txt").read_text() == "not prunenet's"


@pytest.mark.parametrize(
    "extra, message",
    [(["--recover-tokens", "255"], "--recover-tokens must be at least 256"),
     (["--recover-steps", "0"], "--recover-steps must be at least 1")],
    ids=["tokens", "steps"],
)  # fmt: skip
def test_bad_recovery_settings_are_one_line_errors_before_any_work(extra, message, tiny_dir, tmp_path, capsys):
    assert main(compress_args(tiny_dir, tmp_path / "out", "--recover", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [tiny_dir.name]
