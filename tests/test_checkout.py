"""The repository root is a safe place to run Python: ``python -m prunenet`` and the README's Python snippet work
with the checkout as the current folder (first on ``sys.path``), and no top-level name of the checkout shadows an
installed distribution's."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

from running import run_cli

ROOT = Path(__file__).resolve().parent.parent


def user_env() -> dict[str, str]:
    """The environment of a user's shell: the current folder goes first on ``sys.path``."""
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)
    env.pop("PYTHONPATH", None)
    return env


def checkout_import_names() -> set[str]:
    """The top-level names ``import`` finds in the checkout: folders with ``__init__.py`` and ``*.py`` files."""
    names = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    return names | {p.stem for p in ROOT.glob("*.py")}


def test_no_top_level_name_of_the_checkout_is_another_distributions():
    names = checkout_import_names()
    assert "prunenet" in names  # the listing sees packages at all
    owners = importlib.metadata.packages_distributions()
    clashes = {
        name: sorted(d for d in owners.get(name, ()) if d.lower() != "prunenet")
        for name in names
        if name in sys.stdlib_module_names or set(owners.get(name, ())) - {"prunenet"}
    }
    assert not clashes, f"top-level names of the checkout shadow installed packages: {clashes}"


def test_the_guard_would_see_a_kernels_package():
    """Hugging Face's ``kernels`` (which transformers imports at load time) is installed, so a ``kernels/`` package
    at the root would be reported by the test above."""
    assert "kernels" in importlib.metadata.packages_distributions()


def test_python_m_prunenet_compress_runs_from_the_repository_root(tiny_dir, tmp_path):
    out = tmp_path / "out"
    run_cli("compress", "--model", str(tiny_dir), "--ratio", "0.25", "--method", "magnitude", "--out", str(out),
            "--quiet", cwd=ROOT, env=user_env(), timeout=600)  # fmt: skip
    assert (out / "prunenet.json").is_file()


def readme_python_snippet() -> str:
    """The README's "From Python" block."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"From Python:\s*```python\n(.*?)```", text, re.S).group(1)


def test_the_readmes_python_snippet_runs_from_the_repository_root(tiny_dir, tmp_path):
    """The snippet as written, on the tiny model instead of the embedded one (whose 20-episode policy run takes
    minutes) and with its output folders in a temporary folder instead of the checkout."""
    snippet = readme_python_snippet()
    assert 'load_model("smollm2-135m")' in snippet and '"pruned-selfcal"' in snippet
    snippet = snippet.replace('"smollm2-135m"', repr(str(tiny_dir)))
    for folder in ("pruned-selfcal", "pruned-prunenet"):
        snippet = snippet.replace(f'"{folder}"', repr(str(tmp_path / folder)))
    snippet = snippet.replace("episodes=20", "episodes=1")
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, env=user_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "FFN neurons per layer" in proc.stdout
    for folder in ("pruned-selfcal", "pruned-prunenet"):
        assert (tmp_path / folder / "config.json").is_file()
