"""Error compensation (``selfcal --compensate``): the refitted out-projection columns are the damped least-squares
solution, lower the FFN's output error on the probe tokens, and are written the same in memory, streamed (one
layer per pass) and under torchrun, into a model stock ``transformers`` reloads; keeping every neuron or
``--no-compensate`` leaves the weights as selfcal always wrote them; a bad ``--damping`` is one line."""

from __future__ import annotations

import copy
import functools
import os
import socket
import tempfile

import pytest
import torch
import transformers
from running import compress_quietly, run_cli
from tiny_models import all_tensors, auto_class, save_sharded, tiny_model
from untouched import refused

import prunenet.shard_writer as shard_writer
import prunenet.writers as writers
from prunenet.adapters import get_adapter
from prunenet.checkpoint import PARTIAL_MARKER, read_manifest
from prunenet.compensation import GRAM_DTYPE, ColumnStore, compensate, compensated_columns, layer_bytes, solve_bytes
from prunenet.config import PruneConfig
from prunenet.memory_plan import plan_forward
from prunenet.models import load_model
from prunenet.output import partial_folder
from prunenet.pipeline import prune_
from prunenet.probes import self_probes
from prunenet.selectors import SELECTORS
from prunenet.sources import ModelSource
from prunenet.streaming import CheckpointSource

RATIO, SEED, SEQUENCES, LENGTH = 0.25, 3, 2, 16
PROBES = dict(method="selfcal", seed=SEED, probe_sequences=SEQUENCES, probe_length=LENGTH)
run = functools.partial(compress_quietly, ratio=RATIO, **PROBES)


def unit_columns(model: torch.nn.Module, unit: int) -> torch.Tensor:
    """Unit ``unit``'s out-projection as the ``(d, n)`` matrix it multiplies the activations by (a view)."""
    adapter = get_adapter(model.config)
    spec = adapter.out_projection
    layer, expert = divmod(unit, adapter.num_experts(model.config))
    weight = model.get_parameter(adapter.block_prefix(layer) + spec.name).detach()
    weight = weight[expert] if spec.experts else weight
    return weight if spec.axis == 1 else weight.t()


def expected_columns(source, keeps: list[torch.Tensor], damping: float = PruneConfig.damping) -> ColumnStore:
    """The columns compensation gives on the dense model in ``source``, on the probes a run with :data:`PROBES`
    generates: what every writer must put in place of the sliced ones."""
    model, _, _ = load_model(str(source))
    ids = self_probes(model, sequences=SEQUENCES, length=LENGTH, seed=SEED)
    return compensate(model, ids, keeps, damping, ColumnStore(), progress=False)


def offloaded_budget(source) -> int:
    """A --max-memory under which a stream runs :data:`PROBES` reading its blocks from the checkpoint one at a time
    and compensating one layer per forward pass: the least the forward plan allows with compensation."""
    config = transformers.AutoConfig.from_pretrained(source)
    adapter, checkpoint = get_adapter(config), CheckpointSource(source)
    k = adapter.kept_width(RATIO, adapter.ffn_width(config))
    plan = plan_forward(checkpoint, adapter, config, 2**40, "cpu", SEQUENCES, LENGTH)
    one_layer = layer_bytes(adapter, config, checkpoint.state_dtype(adapter, config).itemsize)
    beside = max(plan.kv_bytes, one_layer + solve_bytes(adapter, config, k))  # the selection's, or compensation's
    return plan.resident_bytes + plan.activation_bytes + beside + plan.block_bytes


# -- the solve ----------------------------------------------------------------------------------------------

# Odd sizes, so an index or transpose mix-up shows; more tokens than kept neurons, so H_KK has full rank.
D, N, K, T = 37, 53, 31, 200
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3}


def reference_columns(h: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, damping: float) -> torch.Tensor:
    """``argmin_X sum_t ||W h_t - X h_t[K]||^2 + lam ||X - W_K||^2`` ``(d, k)`` in float64 by ``lstsq`` on the stacked
    system (rows ``h_t[K]`` against ``W h_t``, and ``sqrt(lam) I`` against ``sqrt(lam) W_K^T``): no Gram matrix,
    no normal equations. ``h``: ``(T, n)``; ``weight``: ``(d, n)``."""
    h, w = h.double(), weight.double()
    h_k = h[:, keep]
    lam = damping * (h_k * h_k).sum(0).mean()  # damping * mean(diag H_KK)
    eye = torch.eye(keep.numel(), dtype=torch.float64)
    a = torch.cat([h_k, lam.sqrt() * eye])
    b = torch.cat([h @ w.t(), lam.sqrt() * w[:, keep].t()])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution.t()


def activations(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    """``(tokens, width)`` float64 correlated activations (independent sources mixed at random): ``H`` far from
    diagonal, so that the dropped neurons are partly predictable from the kept ones and the update is large."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g, dtype=torch.float64) * (2 / width**0.5)
    mix += torch.eye(width, dtype=torch.float64)
    return torch.randn(tokens, width, generator=g, dtype=torch.float64) @ mix


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("damping", [0.01, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compensated_columns_are_the_damped_least_squares_solution(dtype, damping, layout):
    """Against a float64 ``lstsq`` of the stacked system: within twice the error of rounding that solution to
    the weight's dtype (plus a small atol), and far from the uncompensated columns (the update is no no-op)."""
    g = torch.Generator().manual_seed(1)
    h = activations(T, N)
    weight = torch.randn(D, N, generator=g).to(dtype)
    if layout == "transposed":  # a (d, n) view of an (n, d) tensor, as GPT-2's Conv1D stores it
        weight = weight.t().contiguous().t()
    keep = torch.randperm(N, generator=g)[:K].sort().values
    got = compensated_columns(h.t() @ h, weight, keep, damping)
    assert got.dtype == dtype and got.shape == (D, K)
    ref = reference_columns(h, weight, keep, damping)
    rounding = (ref.to(dtype).double() - ref).abs().max()
    error = (got.double() - ref).abs().max()
    assert error <= 2 * rounding + ATOL[dtype], (error, rounding)
    moved = (ref - weight[:, keep].double()).abs().max()
    assert moved > 20 * (2 * rounding + ATOL[dtype]), moved


def test_a_unit_no_token_reached_keeps_its_columns():
    weight, keep = torch.randn(D, N), torch.arange(0, N, 2)
    got = compensated_columns(torch.zeros(N, N, dtype=torch.float64), weight, keep, 1.0)
    assert torch.equal(got, weight[:, keep])


def test_a_damping_too_small_for_a_rank_deficient_h_is_a_value_error_naming_damping():
    """Fewer tokens than kept neurons make H_KK singular; 1e-30 of its mean diagonal is below float64's rounding,
    so the Cholesky factorisation fails: a ValueError (one line on the command line), not torch's LinAlgError."""
    h = activations(K // 2, N)
    weight, keep = torch.randn(D, N), torch.arange(K)
    with pytest.raises(ValueError, match="--damping 1e-30 is too small"):
        compensated_columns(h.t() @ h, weight, keep, 1e-30)
    assert compensated_columns(h.t() @ h, weight, keep, 1e-3).isfinite().all()  # damped enough: solvable


def test_compensation_lowers_the_ffn_output_error_on_the_probe_tokens(one_thread):
    """The property the update exists for: on the dense model's FFN inputs over the probe tokens, each pruned
    block's FFN output is closer to the dense one's with the refitted columns than with the sliced ones."""
    dense = tiny_model("llama")
    ids = self_probes(dense, sequences=SEQUENCES, length=LENGTH, seed=SEED)
    inputs = {}
    handles = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
               for i, layer in enumerate(dense.model.layers)]  # fmt: skip
    with torch.no_grad():
        dense(ids)
    for handle in handles:
        handle.remove()
    pruned = {}
    for compensated in (True, False):
        model = copy.deepcopy(dense)
        result = prune_(model, RATIO, compensate=compensated, **PROBES)
        pruned[compensated] = model, result.keeps
    assert all(torch.equal(a, b) for a, b in zip(pruned[True][1], pruned[False][1], strict=True))  # same neurons
    with torch.no_grad():
        for i, x in inputs.items():  # x: (B, T, d), the block's FFN input
            target = dense.model.layers[i].mlp(x)
            refit, sliced = ((pruned[c][0].model.layers[i].mlp(x) - target).double().square().sum() for c in pruned)
            # Measured on this tiny model: about 3.5 times lower in both layers.
            assert refit < sliced, (i, refit, sliced)


# -- every writer ---------------------------------------------------------------------------------------------


def out_projection_names(folder, config) -> set[str]:
    """The out-projection tensors of the checkpoint in ``folder`` (``config``: its own, pruned or not)."""
    return set(shard_writer.out_columns(CheckpointSource(folder), get_adapter(config), config))


# llama: dense; mixtral: experts stored one tensor each; granitemoe: a block's experts fused in one (E, d, n) tensor.
@pytest.mark.parametrize("family", ["llama", "mixtral", "granitemoe"])
def test_in_memory_and_streamed_write_the_same_refitted_columns(family, tmp_path, one_thread):
    """In memory (one pass) and streamed (blocks read one at a time, one layer per pass): the same tensors bit for
    bit; the reloaded model's out-projections are the compensated columns; every other tensor is
    ``--no-compensate``'s."""
    source = tmp_path / "src"
    save_sharded(family, source)
    run(source, tmp_path / "mem", streaming=False)
    run(source, tmp_path / "stream", streaming=True, max_memory=offloaded_budget(source))
    run(source, tmp_path / "plain", streaming=False, compensate=False)
    mem, stream, plain = (read_manifest(tmp_path / name) for name in ("mem", "stream", "plain"))
    assert mem["kept_indices"] == stream["kept_indices"] == plain["kept_indices"]  # compensation selects nothing
    assert stream["streaming"] and stream["memory_plan"]["blocks"] == "disk"
    assert stream["memory_plan"]["compensation_layers"] == stream["compensation"]["layers_per_pass"] == 1
    dense_config = transformers.AutoConfig.from_pretrained(source)
    layers = get_adapter(dense_config).num_layers(dense_config)
    assert stream["compensation"]["passes"] == layers and mem["compensation"]["passes"] == 1
    for manifest in (mem, stream):
        assert manifest["compensation"]["damping"] == PruneConfig.damping
        assert manifest["compensation"]["tokens"] == SEQUENCES * LENGTH
        assert manifest["method_options"]["compensate"] is True
    assert "compensation" not in plain and plain["method_options"]["compensate"] is False

    a, b, c = all_tensors(tmp_path / "mem"), all_tensors(tmp_path / "stream"), all_tensors(tmp_path / "plain")
    assert b.keys() == all_tensors(source).keys()
    assert all(torch.equal(tensor, b[name]) for name, tensor in a.items())
    config = transformers.AutoConfig.from_pretrained(tmp_path / "mem")
    outs = out_projection_names(tmp_path / "mem", config)
    assert outs and a.keys() == c.keys()
    for name in a:  # only the out-projections differ from the uncompensated output
        assert torch.equal(a[name], c[name]) != (name in outs), name

    keeps = [torch.tensor(keep) for keep in mem["kept_indices"]]
    expected = expected_columns(source, keeps)
    dense = auto_class(config).from_pretrained(source)
    for folder in ("mem", "stream"):
        reloaded = auto_class(config).from_pretrained(tmp_path / folder)
        adapter = get_adapter(reloaded.config)
        assert adapter.ffn_width(reloaded.config) == len(keeps[0]) < adapter.ffn_width(dense.config)
        for unit, keep in enumerate(keeps):
            assert torch.equal(unit_columns(reloaded, unit), expected.get(unit)), (folder, unit)
            assert not torch.equal(expected.get(unit), unit_columns(dense, unit)[:, keep]), unit


def test_no_compensate_writes_the_sliced_dense_columns(tiny_dir, tmp_path, one_thread):
    """``--no-compensate`` is selfcal as it was: every FFN tensor the dense one's kept rows / columns."""
    run(tiny_dir, tmp_path / "out", compensate=False)
    keeps = read_manifest(tmp_path / "out")["kept_indices"]
    dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for layer, keep in enumerate(keeps):
        mlp, sliced = dense.model.layers[layer].mlp, pruned.model.layers[layer].mlp
        assert torch.equal(sliced.down_proj.weight, mlp.down_proj.weight[:, keep])
        assert torch.equal(sliced.gate_proj.weight, mlp.gate_proj.weight[keep])
        assert torch.equal(sliced.up_proj.weight, mlp.up_proj.weight[keep])


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streamed"])
def test_keeping_every_neuron_leaves_every_weight_bit_identical(tiny_dir, tmp_path, streaming, one_thread):
    run(tiny_dir, tmp_path / "out", ratio=0.0, streaming=streaming)
    assert "compensation" not in read_manifest(tmp_path / "out")
    src, out = all_tensors(tiny_dir), all_tensors(tmp_path / "out")
    assert src.keys() == out.keys()
    for name, tensor in src.items():
        assert tensor.dtype == out[name].dtype and torch.equal(tensor.view(torch.uint8), out[name].view(torch.uint8))


def test_the_selector_refits_nothing_when_k_is_the_width(one_thread):
    """Called with every neuron kept (``select`` already returns early there), selfcal compensates nothing."""
    model = tiny_model("llama")
    before = {name: p.clone() for name, p in model.named_parameters()}
    source = ModelSource(model)
    config = PruneConfig(ratio=0.0, **PROBES)
    selection = SELECTORS["selfcal"].choose(source, source.width, config, progress=False)
    assert selection.columns is None and "compensation" not in selection.manifest
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


# -- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damping", ["-1", "nan", "0"])
def test_a_bad_damping_is_refused_in_one_line_before_any_work(tiny_dir, tmp_path, capsys, damping):
    argv = ["compress", "--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--ratio", str(RATIO),
            "--method", "selfcal", f"--damping={damping}"]  # fmt: skip
    line = refused(argv, capsys, tmp_path)
    assert "--damping" in line


def test_a_damping_too_small_for_the_probes_is_one_line_and_leaves_nothing(tiny_dir, tmp_path, capsys, one_thread):
    """16 probe tokens for 55 kept neurons: H_KK is singular, and 1e-30 of its scale does not lift it."""
    argv = ["compress", "--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--ratio", str(RATIO),
            "--method", "selfcal", "--probe-sequences", "1", "--probe-length", "16", "--damping", "1e-30",
            "--quiet"]  # fmt: skip
    line = refused(argv, capsys, tmp_path)
    assert "compensating layer 0: --damping 1e-30 is too small" in line and "--no-compensate" in line


# -- resuming -------------------------------------------------------------------------------------------------


def test_a_resumed_streamed_write_reuses_shards_only_with_the_same_columns(tmp_path, monkeypatch, one_thread):
    """A killed run's finished shards are found by a run with the same columns and never by one with others (the
    resume key covers the columns' digest): another --damping writes every shard itself."""
    source = tmp_path / "src"
    save_sharded("llama", source)
    keys, written = [], []
    real_key, real_init = writers.ShardWriter.resume_key, shard_writer.StreamingWriter.__init__

    def key_spy(self, keeps):
        keys.append(real_key(self, keeps))
        return keys[-1]

    def writer_spy(self, path, *args, **kwargs):
        written.append(path.name)
        real_init(self, path, *args, **kwargs)

    monkeypatch.setattr(writers.ShardWriter, "resume_key", key_spy)
    run(source, tmp_path / "ref", streaming=True)
    shards = sorted(p.name for p in (tmp_path / "ref").glob("model-*.safetensors"))
    assert len(shards) > 1

    def killed_run(out):
        """What a run with the reference's inputs left when killed after writing every shard."""
        folder = partial_folder(out, keys[0])
        folder.mkdir()
        (folder / PARTIAL_MARKER).touch()
        for shard in shards:
            (folder / shard).write_bytes((tmp_path / "ref" / shard).read_bytes())

    monkeypatch.setattr(shard_writer.StreamingWriter, "__init__", writer_spy)
    killed_run(tmp_path / "same")
    run(source, tmp_path / "same", streaming=True)
    assert keys[1] == keys[0] and not [name for name in written if name.startswith("model-")]  # all reused

    killed_run(tmp_path / "other")
    run(source, tmp_path / "other", streaming=True, damping=0.5)
    assert keys[2] != keys[0]
    assert sorted(name.removesuffix(".partial") for name in written if name.startswith("model-")) == shards
    assert not partial_folder(tmp_path / "other", keys[0]).exists()  # the stale shards were removed, not used
    ref, other = all_tensors(tmp_path / "ref"), all_tensors(tmp_path / "other")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "ref")
    outs = out_projection_names(tmp_path / "ref", config)
    for name in ref:
        assert torch.equal(ref[name], other[name]) != (name in outs), name


def test_the_spilled_columns_are_removed_after_the_write_and_after_a_failed_one(tmp_path, monkeypatch, one_thread):
    """A stream spills the columns to a temporary folder; it is gone when the run ends, written or failed."""
    source = tmp_path / "src"
    save_sharded("llama", source)
    spill = tmp_path / "tmp"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    seen = []
    real_put = ColumnStore.put

    def put_spy(self, unit, columns):
        real_put(self, unit, columns)
        seen.append(sorted(p.name for p in spill.glob("prunenet-compensation-*/*")))

    monkeypatch.setattr(ColumnStore, "put", put_spy)
    run(source, tmp_path / "out", streaming=True)
    assert seen[-1] == ["0.safetensors", "1.safetensors"]  # spilled, one file per unit
    assert not list(spill.glob("prunenet-compensation-*"))

    def broken(*args, **kwargs):
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(shard_writer, "write_shard", broken)
    with pytest.raises(RuntimeError, match="disk is full"):
        run(source, tmp_path / "failed", streaming=True)
    assert len(seen) == 4 and not list(spill.glob("prunenet-compensation-*"))
    assert not (tmp_path / "failed").exists()


# -- torchrun -------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_torchrun_writes_the_single_process_columns(family, tmp_path):
    """Rank 0 refits, broadcasts the columns unit by unit, and each rank writes its shards with them: the same
    tensors as one process in memory."""
    source = tmp_path / "src"
    save_sharded(family, source)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    proc = run_cli("compress", "--model", str(source), "--out", str(tmp_path / "two"), "--ratio", str(RATIO),
                   "--method", "selfcal", "--seed", str(SEED), "--probe-sequences", str(SEQUENCES), "--probe-length",
                   str(LENGTH), "--device", "cpu", "--quiet", launcher=torchrun, check=False, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    run(source, tmp_path / "one", streaming=False)
    one, two = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert two["kept_indices"] == one["kept_indices"] and two["streaming"]
    assert two["compensation"]["tokens"] == one["compensation"]["tokens"] == SEQUENCES * LENGTH
    a, b = all_tensors(tmp_path / "one"), all_tensors(tmp_path / "two")
    assert b.keys() == all_tensors(source).keys() and all(torch.equal(t, b[name]) for name, t in a.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "src", "two"]  # no partial folders


@pytest.mark.parametrize("damping", [0.01, 1.0])
def test_the_float32_solve_that_ships_is_within_2e_6_relative_of_the_float64_solution(damping):
    """``H`` accumulated in float32 (:data:`GRAM_DTYPE`) and solved in float32, against the float64 ``lstsq`` of the
    stacked system. Measured here: 2.1e-6 (damping 0.01) and 4.5e-7 (1.0) on columns of size up to 5.8."""
    assert GRAM_DTYPE == torch.float32
    g = torch.Generator().manual_seed(1)
    h = activations(T, N)
    weight = torch.randn(D, N, generator=g)
    keep = torch.randperm(N, generator=g)[:K].sort().values
    got = compensated_columns((h.t() @ h).to(GRAM_DTYPE), weight, keep, damping)
    ref = reference_columns(h, weight, keep, damping)
    assert (got.double() - ref).abs().max() <= 2e-6 * ref.abs().max()
    assert (ref - weight[:, keep].double()).abs().max() > 0.1 * ref.abs().max()  # the update is no no-op


@pytest.mark.parametrize("flags", [["--no-compensate"], ["--damping", "0.5"], ["--no-compensate", "--damping", "2"]])
def test_compensation_flags_with_a_method_that_does_not_compensate_are_one_line(tiny_dir, tmp_path, flags):
    out = tmp_path / "out"
    proc = run_cli("compress", "--model", str(tiny_dir), "--ratio", "0.25", "--method", "magnitude", "--out", str(out),
                   *flags, check=False)  # fmt: skip
    assert proc.returncode == 2 and "applies only to --method selfcal" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_an_in_memory_budget_counts_one_layers_compensation(tiny_dir):
    """With --no-streaming, a --max-memory that holds the weights but not one layer's compensation is refused
    before any weights load (without --no-streaming such a run streams instead)."""
    from prunenet.config import CompressConfig
    from prunenet.sources import plan_source

    checkpoint = CheckpointSource(tiny_dir)
    weights = checkpoint.nbytes(None)
    settings = dict(ratio=0.25, method="selfcal", device="cpu", max_memory=str(weights + 1))
    with pytest.raises(ValueError, match="--no-compensate"):
        plan_source(tiny_dir, CompressConfig(**settings, streaming=False))
    assert plan_source(tiny_dir, CompressConfig(**settings, streaming=False, compensate=False)).memory_plan is None
