"""The install paths a user of pip takes, each on the same fresh virtual environment (``make test-install``).

The environment starts with only torch (``PRUNENET_TEST_TORCH``, the Makefile's ``TORCH``; default the
README's ``torch==2.13.0``). The commands are the README's own, from its "Installing by hand" section,
run with the environment activated: an isolated ``pip install`` of the sdist must stop at once with one
line; ``pip install --no-build-isolation`` of the sdist and of a checkout must build the extension; the
wheel must install with a plain ``pip install``. After each, the installed package (not the checkout)
must import, load the native op and slice with it, run a tiny ``prunenet compress`` and report its
version. A missing build prerequisite must stop the build with one line naming it.

The sdist and wheel are ``make dist``'s (``PRUNENET_TEST_DIST``), or built here with ``python -m build``.
Skipped unless ``PRUNENET_TEST_INSTALL=1`` (``make test-install`` sets it): it takes minutes and builds
the extension twice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("PRUNENET_TEST_INSTALL") != "1",
        reason="a fresh venv and two extension builds (minutes): run by make test-install (PRUNENET_TEST_INSTALL=1)",
    ),
]

# The README's commands this test runs, verbatim (test_readme_says_these checks they are there).
TORCH_LINE = "pip install torch==2.13.0"
SOURCE_LINE = "pip install --no-build-isolation ."
SDIST_LINE = "pip install --no-build-isolation dist/prunenet-*.tar.gz"
WHEEL_LINE = "pip install dist/prunenet-*.whl"

# Run in the fresh environment after each install: the package and its native op, from site-packages.
CHECK = r"""
import importlib.metadata, json
import torch
import importlib.util
import prunenet, prunenet.ops as ops
from prunenet.slicing import slice_ffn_

# The Triton kernels ship as prunenet.kernels (their modules import triton, which a CPU torch lacks: found, not run).
assert all(importlib.util.find_spec(f"prunenet.kernels.{op}") for op in ("gram", "ks"))

assert ops.available(), ops.import_error()
w, b, o = torch.randn(6, 4), torch.randn(6), torch.randn(4, 6)
keep = torch.tensor([0, 2, 5])
want = (w[keep].clone(), b[keep].clone(), o[:, keep].clone())
slice_ffn_([w, b], [o], keep, 6, backend="native")  # torch.ops.prunenet.slice_ffn_, or an error
assert all(torch.equal(x, y) for x, y in zip((w, b, o), want))
print(json.dumps({"version": prunenet.__version__, "metadata": importlib.metadata.version("prunenet"),
                  "package": prunenet.__file__, "ext": ops.load().__file__}))
"""


def _readme_install_lines() -> list[str]:
    """The commands of the README's "Installing by hand" code blocks, comments stripped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Installing by hand", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    return [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """{"sdist": ..., "wheel": ...}: make dist's, or built here (python -m build --no-isolation)."""
    folder = os.environ.get("PRUNENET_TEST_DIST")
    if folder:
        folder = Path(folder)
    else:
        pytest.importorskip("build", reason="needs `build` to make the sdist and wheel (make dist installs it)")
        folder = tmp_path_factory.mktemp("dist")
        proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(folder), str(ROOT)],
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = {"sdist": sorted(folder.glob("prunenet-*.tar.gz")), "wheel": sorted(folder.glob("prunenet-*.whl"))}
    assert all(len(v) == 1 for v in found.values()), f"want one sdist and one wheel in {folder}: {found}"
    return {kind: paths[0] for kind, paths in found.items()}


@pytest.fixture(scope="module")
def venv(tmp_path_factory, dists) -> dict:
    """A fresh venv with only torch, and a work folder: a copy of the checkout with dist/ (the dists) in it."""
    base = tmp_path_factory.mktemp("install")
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PRUNENET_", "VIRTUAL_ENV"))}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(env_dir), HF_HUB_OFFLINE="1")
    env["PYTHONSAFEPATH"] = "1"  # a script must not import a prunenet/ lying beside it
    # A checkout as a user has it, without this one's build outputs (its .venv, build/, an in-place _C*.so).
    ignore = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.so", "__pycache__", "*.egg-info", ".*_cache")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=ignore, symlinks=True)
    (src / "dist").symlink_to(dists["sdist"].parent, target_is_directory=True)
    ctx = {"dir": env_dir, "env": env, "src": src, "base": base}
    torch_line = TORCH_LINE
    if os.environ.get("PRUNENET_TEST_TORCH"):
        torch_line = f"pip install {os.environ['PRUNENET_TEST_TORCH']}"
    proc = sh(ctx, torch_line)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return ctx


def sh(ctx: dict, command: str, cwd: Path | None = None, timeout: int = 1200, **env) -> subprocess.CompletedProcess:
    """``command`` in bash with the venv activated (stdout and stderr together), in the work folder."""
    return subprocess.run(["bash", "-c", command], cwd=cwd or ctx["src"], env={**ctx["env"], **env},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)  # fmt: skip


def installed_works(ctx: dict, tiny: Path, version: str, compress: bool = True) -> dict:
    """The checks after an install (cwd outside the work folder, so only site-packages is importable)."""
    site = ctx["dir"] / "lib"
    (ctx["base"] / "check.py").write_text(CHECK)
    proc = sh(ctx, "python check.py", cwd=ctx["base"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["version"] == info["metadata"] == version
    assert Path(info["package"]).is_relative_to(site) and Path(info["ext"]).is_relative_to(site), info
    proc = sh(ctx, "prunenet --version", cwd=ctx["base"])
    assert proc.returncode == 0 and proc.stdout.strip() == f"prunenet {version}", proc.stdout
    if compress:
        out = ctx["base"] / "pruned"
        shutil.rmtree(out, ignore_errors=True)
        cmd = f"prunenet compress --model {tiny} --ratio 0.3 --out {out} --method prunenet --episodes 1 --json --quiet"
        proc = sh(ctx, cmd, cwd=ctx["base"])
        assert proc.returncode == 0, proc.stdout[-3000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["ffn_width_after"] == 51 and (out / "config.json").is_file()
    return info


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    save_tiny_model("llama", folder)
    return folder


def _version(dists) -> str:
    import prunenet

    version = dists["sdist"].name.removeprefix("prunenet-").removesuffix(".tar.gz")
    assert version == prunenet.__version__, "the dists are not of this checkout's version: run make dist"
    return version


def test_readme_says_these():
    lines = _readme_install_lines()
    for line in (TORCH_LINE, SOURCE_LINE, SDIST_LINE, WHEEL_LINE):
        assert line in lines, f"the README's install commands no longer include `{line}`: {lines}"


def test_sdist_holds_what_a_build_needs_and_nothing_else(dists):
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {"setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE", "build_backend/prunenet_build.py"}
    needed |= {str(p.relative_to(ROOT)) for d in ("csrc", "prunenet_kernels", "prunenet") for p in (ROOT / d).rglob("*")
               if p.suffix in {".cpp", ".cu", ".h", ".py"} and "__pycache__" not in p.parts}  # fmt: skip
    assert needed <= names, f"missing from the sdist: {sorted(needed - names)}"
    unneeded = ("tests/", "benchmarks/", "docs/", "tools/", ".")
    unwanted = [n for n in names if n.startswith(unneeded) or n.endswith(".so")]
    assert not unwanted, f"the sdist carries what no build needs: {unwanted[:10]}"
    with zipfile.ZipFile(dists["wheel"]) as whl:
        files = whl.namelist()
    assert any(re.fullmatch(r"prunenet/_C\..*\.so", f) for f in files), "the wheel has no native extension"
    assert "prunenet/kernels/ks.py" in files
    assert not any(f.startswith(("tests/", "prunenet_kernels/", "csrc/")) for f in files)


def test_isolated_install_stops_at_once_with_one_line(venv, dists):
    """Without --no-build-isolation: one line that names the flag, in seconds, and no torch download."""
    tick = time.monotonic()
    proc = sh(venv, SDIST_LINE.replace(" --no-build-isolation", ""))
    elapsed = time.monotonic() - tick
    assert proc.returncode != 0
    ours = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("prunenet:")]
    assert len(ours) == 1 and "--no-build-isolation" in ours[0], proc.stdout
    assert not re.search(r"(Collecting|Downloading) (torch|nvidia)", proc.stdout), proc.stdout
    assert "Traceback" not in proc.stdout and elapsed < 120, (elapsed, proc.stdout)


@pytest.mark.parametrize("missing", ["compiler", "cmake"])
def test_missing_prerequisite_is_one_line_naming_it(venv, dists, missing):
    """No C++ compiler ($CXX names none), or a cmake older than 3.18 first on PATH: the build stops before it
    starts, with exactly one line, which names the missing piece."""
    if missing == "compiler":
        env, expect = {"CXX": "/nonexistent/c++"}, "CXX=/nonexistent/c++ is no installed compiler"
    else:
        fake = venv["base"] / "old-cmake"
        fake.mkdir(exist_ok=True)
        (fake / "cmake").write_text("#!/bin/sh\necho 'cmake version 3.10.2'\n")
        (fake / "cmake").chmod(0o755)
        env, expect = {"PATH": f"{fake}{os.pathsep}{venv['env']['PATH']}"}, "cmake 3.10.2, older than 3.18"
    tick = time.monotonic()
    proc = sh(venv, SDIST_LINE, **env)
    assert proc.returncode != 0
    ours = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("prunenet:")]
    assert len(ours) == 1 and expect in ours[0], proc.stdout
    assert "Traceback" not in proc.stdout and time.monotonic() - tick < 120, proc.stdout


def test_sdist_installs_as_the_readme_says(venv, dists, tiny):
    proc = sh(venv, SDIST_LINE)
    assert proc.returncode == 0, proc.stdout[-5000:]
    installed_works(venv, tiny, _version(dists))


def test_checkout_installs_as_the_readme_says(venv, dists, tiny):
    proc = sh(venv, SOURCE_LINE)
    assert proc.returncode == 0, proc.stdout[-5000:]
    installed_works(venv, tiny, _version(dists), compress=False)  # the same code as the sdist's


def test_wheel_installs_as_the_readme_says(venv, dists, tiny):
    assert sh(venv, "pip uninstall -y prunenet").returncode == 0
    proc = sh(venv, WHEEL_LINE)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "Building wheel" not in proc.stdout  # installed as built, nothing compiled
    installed_works(venv, tiny, _version(dists))
