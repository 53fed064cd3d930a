"""Evaluation: perplexity against transformers' own loss (windows, strides, batching), the lm-eval bridge, cost."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import save_tiny_model, tiny_model, tiny_text, tiny_tokenizer

from prunenet.config import EvalConfig
from prunenet.inference_cost import inference_cost, inference_cost_subprocess
from prunenet.perplexity import document_prefix, perplexity, sliding_windows, tokenize_prefix
from prunenet.zero_shot import PAPER_TASKS, ZeroShotError, _metric, resolve_tasks, zero_shot


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt"])
def test_perplexity_equals_transformers_loss_per_window(name):
    model, tokenizer, text = tiny_model(name), tiny_tokenizer(), tiny_text(1000)
    result = perplexity(model, tokenizer, text, max_tokens=250, context=64, batch_size=3, progress=False)
    ids = tokenize_prefix(tokenizer, text, 250)
    total, count = 0.0, 0
    with torch.no_grad():
        for window in torch.split(ids, 64):
            loss = model(window[None], labels=window[None]).loss  # mean over len - 1 predictions
            total += float(loss) * (window.numel() - 1)
            count += window.numel() - 1
    assert result["tokens"] == count == 250 - 4
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def bos_tokenizer():
    """The tiny tokenizer, adding its BOS in front of every text as Gemma's and Llama's tokenizers do."""
    from tokenizers import processors

    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    return tokenizer


def test_windows_start_with_the_tokenizers_document_prefix_as_unscored_context():
    model, tokenizer, text = tiny_model("llama"), bos_tokenizer(), tiny_text(1000)
    assert document_prefix(tokenizer) == [tokenizer.bos_token_id] and document_prefix(tiny_tokenizer()) == []
    result = perplexity(model, tokenizer, text, max_tokens=250, context=64, batch_size=3, progress=False)
    ids = tokenize_prefix(tokenizer, text, 250)
    assert tokenizer.bos_token_id not in ids.tolist()[:5]  # the text's own tokens, no BOS among them
    total, count = 0.0, 0
    with torch.no_grad():
        for window in torch.split(ids, 64):
            with_bos = torch.cat([torch.tensor([tokenizer.bos_token_id]), window]).double()
            log_p = torch.log_softmax(model(with_bos.long()[None]).logits[0].double(), -1)
            # predictions of window[1:] (the window's first token stays unscored, as without a prefix)
            total -= float(log_p[1:-1].gather(1, window[1:, None]).sum())
            count += window.numel() - 1
    assert result["tokens"] == count == 250 - 4 and result["prefix_tokens"] == 1
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    plain = perplexity(model, tiny_tokenizer(), text, max_tokens=250, context=64, progress=False)
    assert plain["prefix_tokens"] == 0 and plain["perplexity"] != pytest.approx(result["perplexity"], rel=1e-6)


def test_batch_size_does_not_change_perplexity():
    model, tokenizer, text = tiny_model("llama"), tiny_tokenizer(), tiny_text(1000)
    results = [
        perplexity(model, tokenizer, text, max_tokens=300, context=70, batch_size=b, progress=False)["perplexity"]
        for b in (1, 2, 5)
    ]
    assert results[1] == pytest.approx(results[0], rel=1e-5) and results[2] == pytest.approx(results[0], rel=1e-5)


def test_tokenize_prefix_matches_tokenizing_everything():
    tokenizer, text = tiny_tokenizer(), tiny_text(5000)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenize_prefix(tokenizer, text, 777).tolist() == whole[:777]
    assert tokenize_prefix(tokenizer, text, 10**6).tolist() == whole  # more than the text has


def test_too_short_text_and_bad_context_are_rejected():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="too short"):
        perplexity(model, tokenizer, "w5", progress=False)
    with pytest.raises(ValueError, match="--context"):
        perplexity(model, tokenizer, tiny_text(100), context=1, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Sliding windows


@pytest.mark.parametrize(
    "tokens, context, stride", [(250, 64, 64), (250, 64, 16), (257, 64, 63), (64, 64, 1), (65, 64, 64)]
)
def test_sliding_windows_score_each_token_at_most_once(tokens, context, stride):
    windows = sliding_windows(tokens, context, stride)
    scored = [p for _, end, first in windows for p in range(first, end)]
    if stride < context:  # every token but the first, once, in order
        assert scored == list(range(1, tokens))
    else:  # non-overlapping windows: all but each window's first token (it has no context)
        assert scored == [p for p in range(tokens) if p % context]
    for begin, end, first in windows:
        assert end - begin <= context and begin < first < end
        if begin > 0 and stride < context:  # every scored token after the first window sees >= context - stride
            assert first - begin >= context - stride


def test_strided_perplexity_equals_per_window_reference():
    model, tokenizer, text = tiny_model("llama"), tiny_tokenizer(), tiny_text(1000)
    result = perplexity(model, tokenizer, text, max_tokens=200, context=48, stride=20, batch_size=3, progress=False)
    ids = tokenize_prefix(tokenizer, text, 200)
    total, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in sliding_windows(200, 48, 20):
            logp = torch.log_softmax(model(ids[None, begin:end]).logits[0].double(), -1)
            for pos in range(first, end):  # token `pos` is predicted from position pos - 1
                total -= float(logp[pos - 1 - begin, ids[pos]])
                count += 1
    assert result["tokens"] == count == 199 and result["stride"] == 20
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_bad_stride_is_rejected():
    with pytest.raises(ValueError, match="--stride"):
        sliding_windows(100, 32, 33)


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot through lm-eval: a tiny local task (tests/data/lm_eval_tasks). This checks the plumbing between
# prunenet and lm-eval -- loading a local task definition, scoring every choice with our model, reading the
# metrics back -- against an independent computation. It is not a benchmark: the model is random.

TASKS_DIR = Path(__file__).parent / "data" / "lm_eval_tasks"


def _expected_accuracy(model, tokenizer) -> dict[str, float]:
    """acc / acc_norm of the tiny task computed by hand: argmax over choices of log p(" " + choice | context)."""
    rows = [json.loads(line) for line in (TASKS_DIR / "tiny_mc.jsonl").read_text().splitlines()]
    hits = {"acc": 0, "acc_norm": 0}
    for row in rows:
        context = tokenizer(row["context"], add_special_tokens=False)["input_ids"]
        lls = []
        for choice in row["choices"]:
            cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([context + cont])).logits[0].double(), -1)
            lls.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(cont)))
        lls = torch.tensor(lls)
        hits["acc"] += int(lls.argmax()) == row["label"]
        # lm-eval's acc_norm divides by the choice's length in characters
        hits["acc_norm"] += int((lls / torch.tensor([float(len(c)) for c in row["choices"]])).argmax()) == row["label"]
    return {name: count / len(rows) for name, count in hits.items()}


@pytest.fixture(scope="module")
def lm_eval_installed():
    pytest.importorskip("lm_eval", reason="the zero-shot bridge needs the `eval` extra (lm-eval)")


def test_zero_shot_local_task_matches_hand_computation(lm_eval_installed):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    result = zero_shot(model, tokenizer, "prunenet_tiny_mc", tasks_dir=TASKS_DIR, batch_size=3, progress=False)
    task = result["tasks"]["prunenet_tiny_mc"]
    expected = _expected_accuracy(model, tokenizer)
    assert task["examples"] == 12 and task["metric"] == "acc_norm" and result["unavailable"] == {}
    assert task["metrics"] == pytest.approx(expected)
    assert result["average"] == pytest.approx(expected["acc_norm"])
    assert 0 < task["stderr"] < 0.5


def test_zero_shot_reports_unreachable_dataset_and_runs_the_rest(lm_eval_installed, tmp_path, monkeypatch):
    """The offline recipe of docs/evaluation.md (a YAML reading a local JSONL with `dataset_path: json`) runs; a
    task whose dataset is on the Hub only is reported as unavailable, with what to do."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_target: label\ndoc_to_choice: choices\n"
    data = TASKS_DIR / "tiny_mc.jsonl"
    (tmp_path / "local.yaml").write_text(
        f"task: prunenet_local_json\ndataset_path: json\ndataset_kwargs: {{data_files: {{validation: '{data}'}}}}\n"
        f"validation_split: validation\n{common}metric_list: [{{metric: acc}}, {{metric: acc_norm}}]\n"
    )
    (tmp_path / "remote.yaml").write_text(
        f"task: prunenet_remote_mc\ndataset_path: prunenet-tests/not-on-this-machine\ntest_split: test\n{common}"
    )
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    result = zero_shot(model, tokenizer, "prunenet_local_json,prunenet_remote_mc", tasks_dir=tmp_path, progress=False)
    assert list(result["tasks"]) == ["prunenet_local_json"]
    assert result["tasks"]["prunenet_local_json"]["metrics"] == pytest.approx(_expected_accuracy(model, tokenizer))
    reason = result["unavailable"]["prunenet_remote_mc"]
    assert "HF_HUB_OFFLINE" in reason and "--tasks-dir" in reason and "dataset_path: json" in reason
    with pytest.raises(ZeroShotError, match="no zero-shot task could be loaded"):
        zero_shot(model, tokenizer, "prunenet_remote_mc", tasks_dir=tmp_path, progress=False)
    with pytest.raises(ZeroShotError, match="unknown zero-shot task"):
        zero_shot(model, tokenizer, "prunenet_no_such_task", tasks_dir=tmp_path, progress=False)


def test_resolve_tasks():
    assert resolve_tasks("paper") == list(PAPER_TASKS)
    assert resolve_tasks("piqa, winogrande,piqa") == ["piqa", "winogrande"]
    with pytest.raises(ZeroShotError):
        resolve_tasks(" , ")


def test_a_paper_task_reports_the_papers_metric_whatever_the_task_defines():
    """A task of the paper reports the paper's metric (WinoGrande ``acc``, the others ``acc_norm``) whichever
    metrics its definition lists; any other task reports ``acc_norm`` where it defines it, else ``acc``."""

    def task(*metrics):
        return SimpleNamespace(config=SimpleNamespace(metric_list=[{"metric": m} for m in metrics]))

    both, acc_only = task("acc", "acc_norm"), task("acc")
    assert _metric("winogrande", both) == "acc" and _metric("arc_challenge", acc_only) == "acc_norm"
    assert _metric("my_task", both) == "acc_norm" and _metric("my_task", acc_only) == "acc"


# ---------------------------------------------------------------------------------------------------------------
# Inference cost


def test_inference_cost_counts_and_times():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    cost = inference_cost(model, tokenizer, tiny_text(200), prompt_tokens=16, new_tokens=4, repeats=1, progress=False)
    assert cost["parameters"] == sum(p.numel() for p in model.parameters())
    assert cost["weight_bytes"] == 4 * cost["parameters"]  # float32
    assert cost["prefill_tokens_per_s"] > 0 and cost["decode_tokens_per_s"] > 0
    assert cost["peak_memory_bytes"] >= cost["peak_extra_bytes"] >= 0 and cost["memory_method"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_decode_loop_is_greedy_generation(family):
    """The cached decode steps inference_cost times (and selfcal samples with) produce what `generate`
    produces: the key/value cache is passed and read back under the name this transformers uses."""
    from prunenet.compat import forward_with_cache

    model = tiny_model(family)
    prompt = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, cache = forward_with_cache(model, prompt)
        token, tokens = logits[:, -1:].argmax(-1), []
        for _ in range(6):
            tokens.append(int(token))
            logits, cache = forward_with_cache(model, token, cache)
            token = logits[:, -1:].argmax(-1)
        generated = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated[0, 10:].tolist() == tokens


def test_inference_cost_in_a_fresh_process(tmp_path):
    folder = tmp_path / "tiny"
    save_tiny_model("gpt2", folder)
    cost = inference_cost_subprocess(str(folder), prompt_tokens=8, new_tokens=2, repeats=1, progress=False)
    assert cost["parameters"] == sum(p.numel() for p in tiny_model("gpt2").parameters())
    assert cost["peak_memory_bytes"] > cost["weight_bytes"]  # the process holds the interpreter and torch too
    with pytest.raises(ValueError, match="inference cost"):
        inference_cost_subprocess(str(tmp_path / "missing"), progress=False)


def test_a_package_in_the_current_folder_does_not_shadow_the_installed_one(tmp_path, monkeypatch):
    """Run from a folder holding a package of the same name (as a checkout does: its kernels/ folder shadowed
    Hugging Face's kernels package, which transformers imports), the measuring process still imports the
    installed packages."""
    folder = tmp_path / "tiny"
    save_tiny_model("gpt2", folder)
    cwd = tmp_path / "checkout"
    (cwd / "prunenet").mkdir(parents=True)
    (cwd / "prunenet" / "__init__.py").write_text("raise ImportError('the current folder shadowed prunenet')\n")
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)  # what a user's shell has
    cost = inference_cost_subprocess(str(folder), prompt_tokens=8, new_tokens=2, repeats=1, progress=False)
    assert cost["parameters"] > 0


# ---------------------------------------------------------------------------------------------------------------
# The Python API's defaults and checks are EvalConfig's


def test_the_api_defaults_are_the_commands():
    config = EvalConfig()
    cost = {"prompt_tokens": config.cost_prompt_tokens, "new_tokens": config.cost_new_tokens,
            "batch_size": config.cost_batch_size, "repeats": config.cost_repeats}  # fmt: skip
    windows = {"max_tokens": config.max_tokens, "context": config.context, "stride": config.stride}
    expected = {
        perplexity: {**windows, "batch_size": config.batch_size},
        zero_shot: {"batch_size": config.batch_size},
        inference_cost: cost,
        inference_cost_subprocess: {**cost, "dtype": config.dtype},
    }
    for function, defaults in expected.items():
        parameters = inspect.signature(function).parameters
        assert {name: parameters[name].default for name in defaults} == defaults, function.__name__


BAD_VALUES = {
    "prefix": (lambda m, t: tokenize_prefix(t, "w5", 0), "--max-tokens must be at least 1, got 0"),
    "max-tokens": (lambda m, t: perplexity(m, t, "w5", max_tokens=0), "--max-tokens must be at least 1, got 0"),
    "context": (lambda m, t: perplexity(m, t, "w5", context=1), "--context must be at least 2, got 1"),
    "stride": (lambda m, t: perplexity(m, t, "w5", stride=0), "--stride must be at least 1, got 0"),
    "batch-size": (lambda m, t: perplexity(m, t, "w5", batch_size=0), "--batch-size must be at least 1, got 0"),
    "windows": (lambda m, t: sliding_windows(100, 1, 1), "--context must be at least 2, got 1"),
    "windows-stride": (lambda m, t: sliding_windows(100, 32, 33), "--stride must be at most 32, got 33"),
    "cost-repeats": (lambda m, t: inference_cost(m, repeats=0), "--cost-repeats must be at least 1, got 0"),
    "cost-prompt": (lambda m, t: inference_cost(m, prompt_tokens=0), "--cost-prompt-tokens must be at least 1, got 0"),
}


@pytest.mark.parametrize("call, message", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_the_api_rejects_bad_values_with_the_commands_messages(call, message):
    """The same one line as ``prunenet eval`` prints for the flag (EvalConfig.validate runs the same checks)."""
    with pytest.raises(ValueError) as caught:
        call(tiny_model("llama"), tiny_tokenizer())
    assert str(caught.value) == message
