"""benchmarks/quality.py: its grid reproduces what the CLI would measure, and its tables, verdicts and docs block."""

from __future__ import annotations

import importlib.util

import pytest
from bench_loader import load_benchmark
from running import compress_policy_quietly
from tiny_models import save_tiny_model, tiny_text

from prunenet.models import load_model
from prunenet.perplexity import perplexity

quality = load_benchmark("quality")
common = load_benchmark("common")

PPL = dict(max_tokens=200, context=64)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The report's grid on a tiny Llama: 2 ratios x 2 seeds, reuse anchored at 0.3, one text."""
    folder = tmp_path_factory.mktemp("quality") / "tiny-llama"
    save_tiny_model("llama", folder)
    model, tokenizer, _ = load_model(str(folder))
    before = {name: p.clone() for name, p in model.state_dict().items()}
    rows = quality.run_grid(model, tokenizer, {"t": tiny_text(1500)}, ratios=[0.1, 0.3], seeds=[0, 1], episodes=2,
                            reuse="0.3", progress=False, **PPL)  # fmt: skip
    after = model.state_dict()
    assert all(after[name].equal(p) for name, p in before.items()), "the dense model was modified"
    return folder, tokenizer, rows


def _cli_perplexity(folder, tokenizer, out, **compress_args) -> float:
    compress_policy_quietly(folder, out, episodes=2, **compress_args)  # the grid's episodes
    pruned, _, _ = load_model(str(out))
    return perplexity(pruned, tokenizer, tiny_text(1500), progress=False, **PPL)["perplexity"]


def test_grid_matches_compress(grid, tmp_path):
    """Each kind of row equals `prunenet compress` (+ `--policy` reuse) then `prunenet eval` on the same text."""
    folder, tokenizer, rows = grid

    def row(method, ratio, seed, train_ratio=None):
        (hit,) = [r for r in rows if r["method"] == method and r["ratio"] == ratio and r["seed"] == seed
                  and (train_ratio is None or r["train_ratio"] == train_ratio)]  # fmt: skip
        return hit["perplexity"]

    sample = _cli_perplexity(folder, tokenizer, tmp_path / "s", ratio=0.3, seed=1)
    assert row("prunenet-sample", 0.3, 1) == pytest.approx(sample, rel=1e-5)
    topk = _cli_perplexity(
        folder, tokenizer, tmp_path / "k", ratio=0.3, seed=1, policy=tmp_path / "s", selection="topk"
    )
    assert row("prunenet-topk", 0.3, 1) == pytest.approx(topk, rel=1e-5)
    reused = _cli_perplexity(folder, tokenizer, tmp_path / "r", ratio=0.1, seed=1, policy=tmp_path / "s")
    assert row("reuse-sample", 0.1, 1, train_ratio=0.3) == pytest.approx(reused, rel=1e-5)
    rand = _cli_perplexity(folder, tokenizer, tmp_path / "x", ratio=0.1, seed=0, method="random")
    assert row("random", 0.1, 0) == pytest.approx(rand, rel=1e-5)
    mag = _cli_perplexity(folder, tokenizer, tmp_path / "m", ratio=0.1, method="magnitude")
    assert row("magnitude", 0.1, "") == pytest.approx(mag, rel=1e-5)


def test_grid_shape(grid):
    _, _, rows = grid
    count = {}
    for r in rows:
        count[r["method"]] = count.get(r["method"], 0) + 1
    # per ratio: 2 seeds of sample/top-k/random, 1 magnitude; reuse: (0.3 -> 0.1) and (0.1 -> 0.3) x 2 seeds
    assert count == {"dense": 1, "prunenet-sample": 4, "prunenet-topk": 4, "random": 4, "magnitude": 2,
                     "reuse-sample": 4}  # fmt: skip
    assert quality.reuse_pairs([0.05, 0.1, 0.2], "0.1") == [(0.1, 0.05), (0.1, 0.2), (0.05, 0.1), (0.2, 0.1)]
    assert len(quality.reuse_pairs([0.05, 0.1, 0.2], "all")) == 6 and quality.reuse_pairs([0.1], "none") == []
    with pytest.raises(ValueError, match="--reuse"):
        quality.reuse_pairs([0.1, 0.2], "0.3")


def _synthetic_rows() -> list[dict]:
    rows = [{"text": t, "method": "dense", "ratio": 0.0, "train_ratio": "", "seed": "", "perplexity": 20.0,
             "tokens": 100} for t in ("pre1900", "post1900")]  # fmt: skip
    for text in ("pre1900", "post1900"):
        for ratio in (0.1, 0.2):
            for seed in range(3):
                for method, base in (("prunenet-sample", 30), ("prunenet-topk", 45), ("random", 40)):
                    rows.append({"text": text, "method": method, "ratio": ratio, "train_ratio": ratio, "seed": seed,
                                 "perplexity": base * (1 + ratio) + seed, "tokens": 100})  # fmt: skip
            rows.append({"text": text, "method": "magnitude", "ratio": ratio, "train_ratio": "", "seed": "",
                         "perplexity": 1000.0, "tokens": 100})  # fmt: skip
            for seed in range(3):
                rows.append({"text": text, "method": "reuse-sample", "ratio": ratio,
                             "train_ratio": 0.2 if ratio == 0.1 else 0.1, "seed": seed, "perplexity": 33.0,
                             "tokens": 100})  # fmt: skip
    return rows


META = {"date": "2026-01-01T00:00:00+00:00", "git": "abc", "torch": "2.x", "device": "cpu: test (2 threads)",
        "model_label": "a model", "max_tokens": 2048, "context": 512, "episodes": 20, "minutes": 1.5}  # fmt: skip


def test_markdown_states_verdicts_with_numbers():
    text = quality.markdown_report(_synthetic_rows(), META)
    assert "first 2048 tokens" in text and "`pre1900` (1790-1899)" in text and "`post1900` (1900-today)" in text
    # ratio 0.1: sampling median 33 + 1 = 34 vs random 44 + 1 = 45; top-k 49.5 + 1 = 50.5 vs random 45
    assert "yes: 34.0 vs 45.0 (-24%) |" in text and "no: 50.5 vs 45.0 (+12%) |" in text
    assert quality.verdict([1.0, 5.0], [4.0, 9.0]) == "yes: 3.0 vs 6.5 (-54%), ranges overlap"
    assert "PruneNet, sampling beats random in 4 of 4" in text and "PruneNet, top-k beats random in 0 of 4" in text
    assert "| 0.1 | 34.0 (33.0-35.0) | 50.5 (49.5-51.5) | 45.0 (44.0-46.0) | 1000.0 |" in text
    assert "**Policy reuse.**" in text and "| 0.1 | 0.2 | 33.0 (33.0-33.0) | 37.0 (36.0-38.0) |" in text
    s = quality.summary(_synthetic_rows())
    assert s["texts"]["pre1900"]["ratios"]["0.1"]["prunenet-sample_beats_random"] is True
    assert s["texts"]["pre1900"]["ratios"]["0.1"]["prunenet-topk_beats_magnitude"] is True


def test_from_csv_rebuilds_report_plot_and_doc_block(tmp_path, monkeypatch):
    rows = _synthetic_rows()
    common.write_csv(tmp_path / "quality.csv", [{**META, **r} for r in rows])
    page = tmp_path / "results.md"
    page.write_text("# Title\n\n<!-- quality:begin -->\nold\n<!-- quality:end -->\n\n## Next\nkept\n")
    written = []
    monkeypatch.setattr(quality, "update_doc_block", lambda name, content, target: (
        written.append(target), common.update_doc_block(name, content, page)))  # fmt: skip
    assert quality.main(["--from-csv", "--out", str(tmp_path), "--quiet"]) == 0
    assert written == [common.ROOT / "docs" / "results.md"]  # the page that holds the block, not the README
    new = page.read_text()
    assert (
        "old" not in new and new.startswith("# Title\n\n<!-- quality:begin -->\nPerplexity") and "## Next\nkept" in new
    )
    assert (tmp_path / "quality.md").read_text().startswith("Perplexity")
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "quality.png").stat().st_size > 10_000


def test_replace_block_needs_both_markers():
    assert common.replace_block("a\n<!-- x:begin -->\n1\n<!-- x:end -->\nb", "x", "2") == (
        "a\n<!-- x:begin -->\n2\n<!-- x:end -->\nb"
    )
    with pytest.raises(ValueError, match="x:begin"):
        common.replace_block("no markers", "x", "2")


def test_quality_report_extra_rows_merge_into_the_grid_without_touching_it(tmp_path, monkeypatch):
    """`quality.py --extra-rows` adds the fine-tuning / attention section to an existing CSV; twice: no duplicates."""
    grid = _synthetic_rows()
    common.write_csv(tmp_path / "quality.csv", [{**META, **r} for r in grid])
    grid_report = quality.markdown_report(grid, META, None)

    def fake_measure(dense, folders, texts, **kwargs):
        assert kwargs["max_tokens"] == META["max_tokens"] and kwargs["context"] == META["context"]
        rows = []
        for i, method in enumerate(["extra:dense", *folders]):
            for text in texts:
                if method == "extra:finetune" and quality._years_overlap(text, "train"):
                    continue
                rows.append({"text": text, "method": method, "ratio": 0.2, "train_ratio": "", "seed": 0,
                             "perplexity": 10.0 + i, "tokens": 100, "note": f"model {i}"})  # fmt: skip
        return rows

    monkeypatch.setattr(quality, "measure_extra", fake_measure)
    argv = ["--extra-rows", "--pruned", "p", "--finetuned", "f", "--attn", "a", "--out", str(tmp_path), "--no-readme"]
    for _ in range(2):
        assert quality.main([*argv, "--quiet"]) == 0
    rows, _ = quality.read_csv(tmp_path / "quality.csv")
    assert [r for r in rows if not quality.is_extra(r)] == [
        {**{k: str(v) for k, v in r.items()}, "note": "", "extra_run": ""} for r in grid
    ]
    assert len([r for r in rows if quality.is_extra(r)]) == 3 + 3 + 1 + 3  # fine-tuned: only `eval`
    md = (tmp_path / "quality.md").read_text()
    assert md.startswith(grid_report.split("Generated by")[0].strip())  # the grid part is unchanged
    assert "| PruneNet + recovery fine-tuning | - | - | 12.0 | model 2 |" in md
    assert "| FFN + attention | 13.0 | 13.0 | 13.0 | model 3 |" in md
    assert quality._years_overlap("post1900", "train") and not quality._years_overlap("eval", "train")
