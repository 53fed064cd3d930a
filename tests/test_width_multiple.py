"""``--width-multiple M``: the kept FFN width rounded down to a multiple of ``M``.

The reference for every source is the same run at the exact ratio that reaches that width with no rounding
(``ratio = 1 - k / n``, ``M = 1``): rounding the width must change nothing but ``k``. The tiny widths are odd
(74; experts 72 with the family's own multiple of 8) so that a rounding that is not applied shows."""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
import transformers
from running import compress_quietly, run_cli
from test_distributed import free_port
from tiny_models import MOE_WIDTH, WIDTH, all_tensors, save_sharded, save_tiny_model

from prunenet.adapters import get_adapter
from prunenet.checkpoint import read_manifest
from prunenet.widths import kept_width

run = functools.partial(compress_quietly, seed=3)


def reference_width(ratio: float, n: int, multiple: int) -> int:
    """The largest multiple of ``multiple`` at most ``floor((1 - ratio) n)``, else ``multiple``; at most ``n``;
    ``n`` when the ratio keeps everything. Written as a search, not as the arithmetic under test."""
    exact = math.floor(round((1 - ratio) * n, 9))
    if exact == n or multiple == 1:  # M = 1 keeps the exact ratio, even one that leaves nothing (refused later)
        return exact
    below = [k for k in range(multiple, exact + 1, multiple)]
    return min(n, below[-1] if below else multiple)


@pytest.mark.parametrize("n", [1, 7, 74, 1536, 2048, 11008])
@pytest.mark.parametrize("multiple", [1, 3, 8, 64, 128, 256])
@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.9, 0.99])
def test_kept_width_matches_the_reference(ratio, multiple, n):
    assert kept_width(ratio, n, multiple) == reference_width(ratio, n, multiple)


def test_the_families_multiple_stays_a_floor():
    config = transformers.MixtralConfig(num_local_experts=4, intermediate_size=MOE_WIDTH)
    adapter = get_adapter(config)
    assert adapter.width_multiple == 8
    for multiple, expected in [(1, 48), (3, 48), (5, 40), (16, 48), (64, 64)]:  # lcm(3, 8) = 24, lcm(5, 8) = 40
        assert adapter.kept_width(0.25, MOE_WIDTH, multiple) == expected


def assert_same_output(a, b):
    ta, tb = all_tensors(a), all_tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[name], tb[name]) for name in ta)
    assert read_manifest(a)["kept_indices"] == read_manifest(b)["kept_indices"]


@pytest.mark.parametrize("method", ["selfcal", "magnitude", "random"])
@pytest.mark.parametrize("streaming", [False, True])
def test_rounding_changes_only_the_width(tmp_path, method, streaming):
    source = tmp_path / "src"
    save_sharded("llama", source)
    result = run(source, tmp_path / "m16", ratio=0.25, width_multiple=16, method=method, streaming=streaming)
    k = 48  # floor(0.75 * 74) = 55, rounded down to 16
    assert result.k == k
    manifest = read_manifest(tmp_path / "m16")
    assert manifest["width_multiple"] == 16 and manifest["ratio"] == 0.25
    assert manifest["ratio_reached"] == pytest.approx(1 - k / WIDTH, abs=1e-6)
    run(source, tmp_path / "exact", ratio=1 - k / WIDTH, method=method, streaming=streaming)
    assert_same_output(tmp_path / "m16", tmp_path / "exact")
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m16")
    assert pruned.config.intermediate_size == k


def test_experts_round_to_both_multiples(tmp_path):
    source = tmp_path / "src"
    save_tiny_model("mixtral", source)
    result = run(source, tmp_path / "m5", ratio=0.25, width_multiple=5)
    assert result.k == 40  # lcm(5, the experts' 8)
    run(source, tmp_path / "exact", ratio=1 - 40 / MOE_WIDTH)
    assert_same_output(tmp_path / "m5", tmp_path / "exact")
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m5").config.intermediate_size == 40


def test_several_ratios_and_the_cli_summary(tmp_path):
    source = tmp_path / "src"
    save_tiny_model("llama", source)
    proc = run_cli("compress", "--model", str(source), "--out", str(tmp_path / "out"), "--ratio", "0.1,0.3",
                   "--width-multiple", "32", "--device", "cpu", "--quiet")  # fmt: skip
    # 0.1: floor(66.6) = 66 -> 64; 0.3: floor(51.8) = 51 -> 32
    assert "74 -> 64 (13.5% of the neurons removed)" in proc.stdout
    assert "74 -> 32 (56.8% of the neurons removed)" in proc.stdout
    assert read_manifest(tmp_path / "out" / "r0.3")["k"] == 32
    bad = run_cli("compress", "--model", str(source), "--out", str(tmp_path / "bad"), "--ratio", "0.1",
                  "--width-multiple", "0", check=False)  # fmt: skip
    assert bad.returncode == 2 and "--width-multiple must be at least 1, got 0" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_torchrun_rounds_as_one_process(tmp_path):
    source = tmp_path / "src"
    save_sharded("llama", source)
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    args = ["compress", "--model", str(source), "--out", str(tmp_path / "two"), "--ratio", "0.25"]
    args += ["--width-multiple", "16", "--seed", "3", "--device", "cpu", "--quiet"]
    proc = run_cli(*args, launcher=torchrun, check=False, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    run(source, tmp_path / "one", ratio=0.25, width_multiple=16, streaming=True)
    assert read_manifest(tmp_path / "two")["k"] == 48
    assert_same_output(tmp_path / "two", tmp_path / "one")


def test_a_multiple_as_wide_as_the_ffn_removes_nothing_and_says_so(tmp_path, caplog):
    source = tmp_path / "src"
    save_tiny_model("llama", source)
    with caplog.at_level("WARNING", logger="prunenet"):
        result = run(source, tmp_path / "out", ratio=0.3, width_multiple=128, method="magnitude")
    assert result.k == WIDTH and read_manifest(tmp_path / "out")["ratio_reached"] == 0.0
    assert "a multiple of 128 leaves all 74 FFN neurons at ratio 0.3: nothing is removed" in caplog.text
