"""Streaming compression of safetensors checkpoints: the same result as the in-memory path, for every
adapter family, with the non-FFN tensors bit-identical, the output reloadable by stock transformers,
no partial output on failure, and resumption after a kill."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch
import transformers
from running import compress_policy_quietly
from safetensors import safe_open
from tiny_models import CONFIGS, WIDTH, all_tensors, auto_class, sample_inputs, save_sharded, tiny_tokenizer

import prunenet.shard_writer as shard_writer
import prunenet.streaming as streaming
from prunenet.adapters import get_adapter
from prunenet.checkpoint import PARTIAL_MARKER, read_manifest
from prunenet.compensation import layer_bytes, solve_bytes
from prunenet.config import kept_width
from prunenet.memory_plan import plan_forward, plan_memory
from prunenet.model_errors import ModelLoadError
from prunenet.safetensors_io import StreamingWriter, TensorSpec, read_header, read_tensor
from prunenet.streaming import CheckpointSource, CheckpointStates
from prunenet.validate import parse_size

# Two training episodes, one fewer than test_pipeline's: the tests over every family compress each one on
# both paths (in memory and streamed), and two episodes already compare their training past the first.
run = functools.partial(compress_policy_quietly, ratio=0.25, episodes=2)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_streaming_equals_in_memory_for_every_family(family, tmp_path):
    source = tmp_path / "src"
    dense = save_sharded(family, source)
    assert len(list(source.glob("*.safetensors"))) > 1  # really sharded
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    run(source, tmp_path / "mem", streaming=False)
    run(source, tmp_path / "stream", streaming=True)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # source untouched

    mem_manifest, stream_manifest = read_manifest(tmp_path / "mem"), read_manifest(tmp_path / "stream")
    assert stream_manifest["streaming"] and not mem_manifest["streaming"]
    assert stream_manifest["kept_indices"] == mem_manifest["kept_indices"]
    assert stream_manifest["training"]["episode_rewards"] == mem_manifest["training"]["episode_rewards"]
    assert stream_manifest["params_after"] == mem_manifest["params_after"]

    mem, stream = all_tensors(tmp_path / "mem"), all_tensors(tmp_path / "stream")
    src = all_tensors(source)
    assert stream.keys() == src.keys()
    adapter, config = get_adapter(dense.config), dense.config
    ffn = CheckpointSource(source).ffn_tensors(adapter, config)
    for name, tensor in stream.items():
        assert tensor.dtype == src[name].dtype
        if name not in ffn:  # copied through: the very same bytes
            assert tensor.reshape(-1).view(torch.uint8).equal(src[name].reshape(-1).view(torch.uint8)), name
        if name in mem:  # the in-memory path drops tied duplicates; every tensor it saved is equal
            assert torch.equal(tensor, mem[name]), name

    # Stock transformers reloads it at the pruned width and computes the same logits as in-memory.
    k = adapter.kept_width(0.25, adapter.ffn_width(config))
    reloaded = auto_class(config).from_pretrained(tmp_path / "stream").eval()
    assert adapter.ffn_width(reloaded.config) == k
    reference = auto_class(config).from_pretrained(tmp_path / "mem").eval()
    with torch.no_grad():
        x = sample_inputs()
        assert torch.equal(reloaded(x).logits, reference(x).logits)
    assert (tmp_path / "stream" / "tokenizer.json").is_file()


def forward_plan_budget(source, blocks: str, compensate_ratio: float | None = None) -> int:
    """A --max-memory under which a stream runs selfcal (8 x 128 probes) with its blocks placed as ``blocks`` says;
    with ``compensate_ratio``, refitting the columns kept at that ratio too (for ``"disk"``, the least the plan
    allows: one layer's compensation, or the selection's KV cache where that is larger)."""
    config = transformers.AutoConfig.from_pretrained(source)
    adapter, checkpoint = get_adapter(config), CheckpointSource(source)
    k = adapter.kept_width(compensate_ratio, adapter.ffn_width(config)) if compensate_ratio is not None else None
    plan = plan_forward(checkpoint, adapter, config, 2**40, "cpu", 8, 128, k)
    if blocks == "device":
        return plan.estimate
    beside = plan.kv_bytes  # the selection pass's; the compensation passes hold one layer's H and solve instead
    if k is not None:
        itemsize = checkpoint.state_dtype(adapter, config).itemsize
        beside = max(beside, layer_bytes(adapter, config, itemsize) + solve_bytes(adapter, config, k))
    return plan.resident_bytes + plan.activation_bytes + beside + plan.block_bytes + 1


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_streaming_selfcal_equals_in_memory_selfcal(family, tmp_path, one_thread):
    """The model run block by block (offloaded to the checkpoint, or every block resident) gives the same
    probes and statistics as the model in memory, and the same refitted columns (the layers in as many passes
    as the plan says): the same kept neurons and output tensors."""
    source = tmp_path / "src"
    save_sharded(family, source)
    run(source, tmp_path / "mem", streaming=False, method="selfcal", seed=2, compensate=True)
    expected, mem = read_manifest(tmp_path / "mem")["kept_indices"], all_tensors(tmp_path / "mem")
    for blocks in ("disk", "device"):
        out = tmp_path / blocks
        budget = forward_plan_budget(source, blocks, compensate_ratio=0.25)
        run(source, out, streaming=True, method="selfcal", seed=2, compensate=True, max_memory=budget)
        manifest = read_manifest(out)
        assert manifest["memory_plan"]["blocks"] == blocks and manifest["kept_indices"] == expected
        assert manifest["compensation"]["layers_per_pass"] == manifest["memory_plan"]["compensation_layers"] >= 1
        stream = all_tensors(out)
        assert all(torch.equal(tensor, stream[name]) for name, tensor in mem.items())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "mistral"])
def test_streaming_attention_slicing_equals_in_memory(family, tmp_path):
    """--modules ffn+attn streams too (choosing KV groups reads only o_proj weights): the same kept groups,
    heads in the config and tensors as in memory (qwen2's q/k/v biases included), and stock reload."""
    source = tmp_path / "src"
    save_sharded(family, source)
    for path, streams in (("mem", False), ("stream", True)):
        run(source, tmp_path / path, streaming=streams, modules="ffn+attn", ratio=0.5)
    mem, stream = read_manifest(tmp_path / "mem"), read_manifest(tmp_path / "stream")
    assert stream["attention"] == mem["attention"] and stream["kept_indices"] == mem["kept_indices"]
    assert stream["params_after"] == mem["params_after"]
    a, b = all_tensors(tmp_path / "mem"), all_tensors(tmp_path / "stream")
    assert all(torch.equal(tensor, b[name]) for name, tensor in a.items())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mem").eval()
    assert reloaded.config.num_key_value_heads == mem["attention"]["kv_heads_after"]
    with torch.no_grad():
        x = sample_inputs()
        assert torch.equal(reloaded(x).logits, reference(x).logits)


def test_a_budget_too_small_for_one_block_is_refused_before_any_work(tmp_path, monkeypatch):
    source = tmp_path / "src"
    save_sharded("llama", source)
    monkeypatch.setattr("prunenet.offload.OffloadedModel.__enter__", lambda self: pytest.fail("did work"))
    with pytest.raises(ValueError, match="cannot run this model one block at a time: it needs at least"):
        run(source, tmp_path / "out", streaming=True, method="selfcal", max_memory="100MiB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("damage", ["missing-shard", "truncated-shard"])
def test_a_damaged_checkpoint_is_refused_before_selfcal_runs_it(damage, tmp_path, monkeypatch):
    """Streaming self-calibration reads blocks late (each as it runs), so the checkpoint is checked whole
    first: a missing shard or a tensor cut short is one clear error before any forward pass or output."""
    source = tmp_path / "src"
    save_sharded("llama", source)
    shard = sorted(source.glob("model-*.safetensors"))[-1]
    if damage == "missing-shard":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size - 64])
    monkeypatch.setattr("prunenet.offload.OffloadedModel.__enter__", lambda self: pytest.fail("ran the model"))
    with pytest.raises(ModelLoadError, match=shard.name) as err:
        run(source, tmp_path / "out", streaming=True, method="selfcal")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_streamed_ffn_tensors_are_the_kept_rows_and_columns(tmp_path):
    """Independent of the in-memory path: each sliced tensor is the source tensor indexed by the manifest."""
    source = tmp_path / "src"
    dense = save_sharded("llama-mlp-bias", source)
    run(source, tmp_path / "out", streaming=True, method="random", seed=3)
    keeps = read_manifest(tmp_path / "out")["kept_indices"]
    out = all_tensors(tmp_path / "out")
    for layer, keep in enumerate(keeps):
        keep = torch.tensor(keep)
        mlp = dense.model.layers[layer].mlp
        prefix = f"model.layers.{layer}.mlp."
        assert torch.equal(out[prefix + "gate_proj.weight"], mlp.gate_proj.weight[keep])
        assert torch.equal(out[prefix + "up_proj.bias"], mlp.up_proj.bias[keep])
        assert torch.equal(out[prefix + "down_proj.weight"], mlp.down_proj.weight[:, keep])


def test_index_and_config_are_rewritten(tmp_path):
    source = tmp_path / "src"
    save_sharded("llama", source)
    run(source, tmp_path / "out", streaming=True, method="random")
    index = json.loads((tmp_path / "out" / streaming.INDEX_FILE).read_text())
    src_index = json.loads((source / streaming.INDEX_FILE).read_text())
    assert index["weight_map"] == src_index["weight_map"]
    sizes = sum(e.nbytes for p in (tmp_path / "out").glob("model-*.safetensors") for e in read_header(p)[0].values())
    assert index["metadata"]["total_size"] == sizes < src_index["metadata"]["total_size"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["intermediate_size"] == kept_width(0.25, WIDTH)
    assert json.loads((source / "config.json").read_text())["intermediate_size"] == WIDTH


class Killed(Exception):
    pass


def test_failure_after_the_first_shard_leaves_no_output_and_the_source_untouched(tmp_path, monkeypatch):
    source = tmp_path / "src"
    save_sharded("llama", source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    real, calls = shard_writer.write_shard, []

    def dies_after_one(*args, **kwargs):
        if calls:
            raise Killed("simulated crash")
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(shard_writer, "write_shard", dies_after_one)
    with pytest.raises(Killed):
        run(source, tmp_path / "out", streaming=True, method="random")
    assert calls  # it did die in the middle
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no partial folder either
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_a_killed_run_resumes_from_its_finished_shards(tmp_path, monkeypatch):
    """After SIGKILL the partial folder stays; the same command finds its finished shards and skips them."""
    source = tmp_path / "src"
    save_sharded("llama", source)
    run(source, tmp_path / "ref", streaming=True, method="random")
    # Simulate the kill: the first run wrote every shard of a partial folder and then vanished.
    keeps = [torch.tensor(k) for k in read_manifest(tmp_path / "ref")["kept_indices"]]
    checkpoint, config = CheckpointSource(source), transformers.AutoConfig.from_pretrained(source)
    key = shard_writer.resume_key(checkpoint, shard_writer.ffn_slices(checkpoint, get_adapter(config), config, keeps))
    partial = tmp_path / f".out.partial-{key}"
    partial.mkdir()
    (partial / PARTIAL_MARKER).touch()  # made by the writer with the folder: what marks it as prunenet's
    shards = sorted(p.name for p in (tmp_path / "ref").glob("model-*.safetensors"))
    (partial / shards[0]).write_bytes((tmp_path / "ref" / shards[0]).read_bytes())
    (partial / (shards[1] + ".partial")).write_bytes(b"half-written garbage")
    written = []
    real = shard_writer.StreamingWriter.__init__

    def spy(self, path, *args, **kwargs):
        written.append(path.name)
        real(self, path, *args, **kwargs)

    monkeypatch.setattr(shard_writer.StreamingWriter, "__init__", spy)
    run(source, tmp_path / "out", streaming=True, method="random")
    assert shards[0] + ".partial" not in written and shards[1] + ".partial" in written
    assert not partial.exists()
    assert all_tensors(tmp_path / "out").keys() == all_tensors(tmp_path / "ref").keys()
    for name, t in all_tensors(tmp_path / "out").items():
        assert torch.equal(t, all_tensors(tmp_path / "ref")[name])
    assert not list((tmp_path / "out").glob("*.partial"))


def test_auto_choice_streams_only_above_the_budget(tmp_path):
    source = tmp_path / "src"
    save_sharded("llama", source)
    assert not run(source, tmp_path / "a", method="random").streaming  # fits the free memory
    assert run(source, tmp_path / "b", method="random", max_memory="10KB").streaming
    assert read_manifest(tmp_path / "b")["memory_plan"]["budget"] == 10_000


def test_streaming_refusals_are_clear(tmp_path):
    source = tmp_path / "src"
    save_sharded("llama", source)
    with pytest.raises(ValueError, match="--no-streaming"):
        run(source, tmp_path / "a", streaming=True, dtype="fp16")
    with pytest.raises(ValueError, match="cannot read"):
        run(source, tmp_path / "a", max_memory="lots")
    sorted(source.glob("model-*.safetensors"))[0].rename(source / "moved")
    with pytest.raises(Exception, match="missing"):
        run(source, tmp_path / "a", streaming=True)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("residency", ["device", "host", "disk"])
def test_checkpoint_states_match_the_model_views(tmp_path, residency):
    source = tmp_path / "src"
    dense = save_sharded("phi3", source)  # fused gate_up: the state is the first n rows
    adapter = get_adapter(dense.config)
    states = CheckpointStates(CheckpointSource(source), adapter, dense.config, "cpu", residency)
    assert len(states) == 2 and states.shape == (WIDTH, 32)
    for _ in range(2):  # in order twice: the read-ahead wraps around
        for i in range(len(states)):
            assert torch.equal(states[i], adapter.layer_state(dense, i))
    assert torch.equal(states[1], adapter.layer_state(dense, 1))  # out of order
    states.close()


def test_memory_plan_spills_what_does_not_fit():
    # LLaMA-2-7B fp16 at ratio 0.3: 2.9 GB of states and 2.1 GB of W^T W do not fit 3 GiB with the policy.
    plan = plan_memory(32, 11008, 4096, 2, 7705, parse_size("3GiB"), "cpu")
    assert (plan.states, plan.grams) == ("disk", "disk") and plan.estimate <= parse_size("3GiB")
    roomy = plan_memory(32, 11008, 4096, 2, 7705, parse_size("64GiB"), "cpu")
    assert (roomy.states, roomy.grams) == ("device", "device")
    assert plan_memory(32, 11008, 4096, 2, 3000, parse_size("64GiB"), "cpu").grams == "none"  # 2k < n
    assert "budget 3.00 GiB" in plan.describe()


def six_block_checkpoint(folder):
    """A 6-block llama checkpoint (150 MB in 20 MB shards) with the tiny tokenizer, saved in ``folder``."""
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=4096, num_hidden_layers=6,
                                      num_attention_heads=8, max_position_embeddings=64)  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="20MB")
    tiny_tokenizer().save_pretrained(folder)
    return folder


def peak_of_compress(source, out, flags: list[str]) -> tuple[int, dict]:
    """``compress --streaming`` of ``source`` in a fresh process: its peak resident memory (VmHWM, which exec
    resets) and the manifest's memory plan."""
    argv = ["compress", "--model", str(source), "--out", str(out), "--ratio", "0.3", "--streaming", "--quiet", *flags]
    code = (
        f"import sys; from prunenet.cli import main\ncode = main({argv!r})\n"
        "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1]), read_manifest(out)["memory_plan"]


def test_the_memory_plan_bounds_the_measured_peak_of_a_streaming_run(tmp_path):
    """A fresh process streams a 6-layer checkpoint (150 MB; states held in memory, W^T W too at ratio 0.3):
    its peak resident memory (VmHWM, which exec resets) stays below the plan's estimate, runtime included."""
    source = six_block_checkpoint(tmp_path / "src")
    peak, plan = peak_of_compress(
        source, tmp_path / "out", ["--method", "prunenet", "--episodes", "2", "--max-memory", "4GiB"]
    )
    assert (plan["states"], plan["grams"]) == ("device", "device")
    assert peak <= plan["estimate"], (peak >> 20, plan["estimate"] >> 20)


def test_the_forward_plan_bounds_the_measured_peak_of_a_streaming_selfcal_run(tmp_path):
    """Self-calibration on a 6-block checkpoint with its blocks read from disk (the budget holds one): the
    process's peak resident memory stays below the forward plan's estimate, runtime included."""
    source = six_block_checkpoint(tmp_path / "src")
    budget = forward_plan_budget(source, "disk")
    flags = ["--method", "selfcal", "--no-compensate", "--max-memory", str(budget)]
    peak, plan = peak_of_compress(source, tmp_path / "out", flags)
    assert plan["blocks"] == "disk" and peak <= plan["estimate"], (peak >> 20, plan["estimate"] >> 20)


@pytest.mark.slow
def test_the_forward_plan_bounds_the_measured_peak_of_a_compensating_run(tmp_path):
    """Self-calibration and compensation on a 6-block checkpoint, its blocks read from disk and one layer's
    ``H`` (128 MiB float64) and solve held per pass: the peak stays below the forward plan's estimate."""
    source = six_block_checkpoint(tmp_path / "src")
    budget = forward_plan_budget(source, "disk", compensate_ratio=0.3)
    flags = ["--method", "selfcal", "--compensate", "--max-memory", str(budget)]
    peak, plan = peak_of_compress(source, tmp_path / "out", flags)
    assert (plan["blocks"], plan["compensation_layers"]) == ("disk", 1)
    assert peak <= plan["estimate"], (peak >> 20, plan["estimate"] >> 20)


def test_parse_size():
    assert parse_size("4GiB") == 4 * 2**30 and parse_size("512 MiB") == 512 * 2**20
    assert parse_size("3GB") == 3_000_000_000 and parse_size("1.5k") == 1500 and parse_size(2048) == 2048
    for bad in ("", "4 parsecs", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_streaming_writer_round_trips_through_the_safetensors_library(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": (torch.randn(7, 3, generator=g) * 50).to(dtype),
        "empty": torch.zeros(0, 5, dtype=dtype),
        "b.c": (torch.randn(11, generator=g) * 50).to(dtype),
    }
    path = tmp_path / "x.safetensors"
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with StreamingWriter(path, specs, {"format": "pt"}) as w:
        for n, t in tensors.items():
            w.write(n, t)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for n, t in tensors.items():
            assert torch.equal(f.get_tensor(n), t)
    entries, _ = read_header(path)
    for n, t in tensors.items():
        assert torch.equal(read_tensor(entries[n]), t)
    with pytest.raises(ValueError, match="expected 'a'"), StreamingWriter(tmp_path / "y", specs) as w:
        w.write("b.c", tensors["b.c"])
