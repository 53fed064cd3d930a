"""prunenet's PEP 517 build backend: setuptools' own (``setuptools.build_meta``), with the prerequisites
of the native extension checked before setuptools does any work.

Why a backend of its own: ``prunenet._C`` is compiled by CMake against the torch that will import it, so
a wheel build needs that torch importable (pip's default isolated build hides it: it sees only the build
requirements), CMake, a C++ compiler and Python's headers. Left to setuptools, a missing piece shows up
as a traceback deep inside the build, after the packages were copied; and listing torch as a build
requirement would make an isolated build download a second, multi-GB torch to build against. Here every
missing piece is one line naming the command that fixes it, printed before anything else runs, and the
build stops with exit status 1. An sdist needs none of it: its hooks are setuptools' unchanged.

``setup.py`` imports the same helpers (``problems``, ``cmake``, ``cuda_variant``) to drive CMake, so what
is checked here is what the build then uses. Environment switches: see ``setup.py``'s docstring.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

MIN_SETUPTOOLS = (77,)  # PEP 639 license metadata: `license = "Apache-2.0"` and license-files
MIN_CMAKE = (3, 18)
MIN_TORCH = (2, 4)  # as in pyproject.toml's dependencies
TORCH_CXX20 = (2, 14)  # torch's headers need C++20 from this version on (CMakeLists.txt selects it)
TORCH_HINT = "pip install torch==2.13.0 (or the CUDA build you want)"
SKIP_HINT = "or set PRUNENET_SKIP_EXT=1 to install without the native extension"


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _version_tuple(text: str) -> tuple[int, ...]:
    """(2, 13, 0) from '2.13.0+cpu', (3, 25, 1) from '3.25.1', () when it has no leading number."""
    m = re.match(r"(\d+(?:\.\d+)*)", text)
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------ the tools


def cmake() -> str | None:
    """The cmake to build with: on PATH, else beside this interpreter (the `cmake` pip package in a venv
    that is not activated: ``/path/to/venv/bin/pip install ...`` leaves the venv's bin/ off PATH)."""
    found = shutil.which("cmake")
    if found:
        return found
    beside = Path(sys.executable).parent / "cmake"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def _cxx() -> list[str] | None:
    """The C++ compiler CMake will pick: $CXX (it may carry arguments, e.g. "ccache g++"), else the first
    of c++, g++, clang++ on PATH (CMake's own search order, less compilers this build does not support)."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return [shutil.which(name)]
    return None


def _compiles(cxx: list[str], standard: int) -> bool:
    """Whether ``cxx`` compiles C++``standard`` (a syntax-only run: a fraction of a second)."""
    value = {17: "201703L", 20: "202002L"}[standard]
    source = f"#include <optional>\nstatic_assert(__cplusplus >= {value});\nint main() {{ return 0; }}\n"
    proc = _run([*cxx, f"-std=c++{standard}", "-fsyntax-only", "-x", "c++", "-"], input=source)
    return proc is not None and proc.returncode == 0


def cuda_home() -> Path | None:
    """The CUDA toolkit root (the folder with bin/nvcc and include/cuda_runtime.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:  # may be a wrapper script (e.g. /usr/local/bin/nvcc): only trust a real toolkit layout
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").is_file() and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home)
    return None


def nvcc_version(home: Path) -> str | None:
    proc = _run([str(home / "bin" / "nvcc"), "--version"])
    m = re.search(r"release (\d+\.\d+)", proc.stdout) if proc else None
    return m.group(1) if m else None


def cuda_variant(torch) -> tuple[Path | None, str, str | None]:
    """(the CUDA toolkit to compile with, None for the CPU-only variant; why, for the build log; the
    problem line when the build must stop instead).

    The CUDA kernels are compiled when torch is a CUDA build and a toolkit is found whose major version is
    torch's CUDA's (code built by a toolkit of the same major runs on torch's CUDA runtime). No toolkit at
    all gives the CPU-only variant, unless PRUNENET_FORCE_CUDA=1 asks for CUDA. A toolkit of another major
    stops the build, as in torch.utils.cpp_extension: whoever has a toolkit and a CUDA torch expects the
    CUDA variant, and a CPU-only build would hide the mismatch until run time.
    """
    force = os.environ.get("PRUNENET_FORCE_CUDA") == "1"
    if os.environ.get("PRUNENET_SKIP_CUDA") == "1":
        problem = "prunenet: PRUNENET_FORCE_CUDA=1 contradicts PRUNENET_SKIP_CUDA=1: unset one"
        return None, "PRUNENET_SKIP_CUDA=1", problem if force else None
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is not a CUDA build"
        return None, why, f"prunenet: PRUNENET_FORCE_CUDA=1, but {why}: install a CUDA torch first" if force else None
    major = torch.version.cuda.split(".")[0]
    home = cuda_home()
    if home is None:
        why = "no CUDA toolkit: CUDA_HOME unset, no /usr/local/cuda, no nvcc on PATH"
        fix = f"set CUDA_HOME to a CUDA {major}.x toolkit (the folder with bin/nvcc)"
        return None, why, f"prunenet: PRUNENET_FORCE_CUDA=1, but {why}: {fix}" if force else None
    nvcc = nvcc_version(home)
    if nvcc is None or nvcc.split(".")[0] != major:
        problem = (
            f"prunenet: nvcc {nvcc} in {home} does not match torch {torch.__version__} (CUDA {torch.version.cuda}): "
            f"set CUDA_HOME to a CUDA {major}.x toolkit, or PRUNENET_SKIP_CUDA=1 for the CPU-only extension"
        )
        return None, "nvcc does not match torch", problem
    return home, f"nvcc {nvcc} in {home}, torch {torch.__version__} (CUDA {torch.version.cuda})", None


# ----------------------------------------------------------------------------------- the checks


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _setuptools_problem() -> str | None:
    version = _installed("setuptools")
    fix = f'pip install "setuptools>={_dotted(MIN_SETUPTOOLS)}"'
    if version is None:
        return f"prunenet: setuptools (the build backend) is not installed: {fix}"
    if _version_tuple(version) < MIN_SETUPTOOLS:
        return f"prunenet: setuptools {version} is too old to build this package: {fix}"
    return None


def _torch_problem() -> str | None:
    """None if torch is importable here; else why not, and what to run."""
    if importlib.util.find_spec("torch") is not None:
        return None
    # Does this interpreter see torch without PYTHONPATH (-I), through which pip's isolated build hides the
    # environment's packages? Then torch is installed, the build is isolated, and the flag is the fix.
    probe = _run([sys.executable, "-I", "-c", "import importlib.util as u; print(u.find_spec('torch') is not None)"])
    if probe is not None and probe.stdout.strip() == "True":
        return (
            "prunenet: an isolated build cannot see the installed torch, which prunenet._C must be built against: "
            f"use pip install --no-build-isolation (python -m build --no-isolation), {SKIP_HINT}"
        )
    return (
        "prunenet: torch is not installed, and prunenet._C is built against the torch that will import it: "
        f"{TORCH_HINT} first, then pip install --no-build-isolation (an isolated build cannot see it), {SKIP_HINT}"
    )


def _import_torch(found: list[str]):
    """torch, imported; None (and the reason in ``found``) where it is missing, broken or too old."""
    problem = _torch_problem()
    if problem:
        found.append(problem)
        return None
    try:
        import torch
    except Exception as err:  # installed but broken (a missing shared library, say)
        found.append(f"prunenet: torch does not import ({type(err).__name__}: {err}): reinstall it: {TORCH_HINT}")
        return None
    if _version_tuple(torch.__version__)[:2] < MIN_TORCH:
        found.append(f"prunenet: torch {torch.__version__} is older than {_dotted(MIN_TORCH)}: {TORCH_HINT}")
        return None
    # pybind11 comes from torch (CMakeLists.txt): every torch wheel ships its headers.
    include = Path(torch.__file__).parent / "include"
    if not (include / "pybind11" / "pybind11.h").is_file():
        found.append(f"prunenet: torch has no C++ headers (no {include}/pybind11): reinstall it: {TORCH_HINT}")
        return None
    return torch


@functools.cache
def problems() -> tuple[str, ...]:
    """One line per missing prerequisite of a wheel build (empty: the build can go ahead). Cached: pip
    calls several hooks in one process, and ``setup.py`` asks again before it builds."""
    found = [p for p in [_setuptools_problem()] if p]
    if os.environ.get("PRUNENET_SKIP_EXT") == "1":
        return tuple(found)

    torch = _import_torch(found)
    cmake_fix = f'pip install "cmake>={_dotted(MIN_CMAKE)}" (or apt-get install cmake)'
    path = cmake()
    if path is None:
        found.append(f"prunenet: cmake is not installed (it builds prunenet._C): {cmake_fix}")
    else:
        proc = _run([path, "--version"])
        m = re.search(r"version (\S+)", proc.stdout) if proc else None
        version = _version_tuple(m.group(1)) if m else ()
        if version < MIN_CMAKE:
            found.append(f"prunenet: {path} is cmake {_dotted(version) or '(unknown)'}, older than 3.18: {cmake_fix}")
    if "ninja" in os.environ.get("CMAKE_GENERATOR", "").lower():
        if not (shutil.which("ninja") or (Path(sys.executable).parent / "ninja").is_file()):
            found.append("prunenet: CMAKE_GENERATOR asks for Ninja, which is not installed: pip install ninja")
    elif not (shutil.which("make") or shutil.which("gmake")):
        found.append("prunenet: make (CMake's build tool) is not installed: apt-get install make")

    standard = 20 if torch is not None and _version_tuple(torch.__version__)[:2] >= TORCH_CXX20 else 17
    cxx = _cxx()
    if cxx is None:
        found.append(f"prunenet: no C++{standard} compiler (c++, g++, clang++ or $CXX): apt-get install g++")
    elif shutil.which(cxx[0]) is None:
        found.append(f"prunenet: CXX={os.environ['CXX']} is no installed compiler: set CXX to a C++{standard} one")
    elif not _compiles(cxx, standard):
        gcc = 10 if standard == 20 else 7
        fix = f"apt-get install g++ (GCC >= {gcc}), or set CXX"
        found.append(f"prunenet: {' '.join(cxx)} does not compile C++{standard}: {fix}")

    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        python = f"python{sys.version_info.major}.{sys.version_info.minor}"
        found.append(f"prunenet: Python's headers are missing (no {include}/Python.h): apt-get install {python}-dev")

    if torch is not None:
        found.extend(p for p in [cuda_variant(torch)[2]] if p)
    return tuple(found)


def check() -> None:
    """Print every problem (one line each, on stderr) and stop the build with exit status 1, or return."""
    found = problems()
    if found:
        print("\n".join(found), file=sys.stderr, flush=True)
        raise SystemExit(1)


def _say_what_skipping_gives_up() -> None:
    if os.environ.get("PRUNENET_SKIP_EXT") == "1":
        print(
            "prunenet: PRUNENET_SKIP_EXT=1: no native extension prunenet._C; FFNs are then sliced by PyTorch "
            "(index_select copies: the same result, more peak memory, slower on large FFNs)",
            file=sys.stderr,
            flush=True,
        )


# ------------------------------------------------------------------------------ the PEP 517 hooks


def _setuptools():
    """setuptools' backend, which does the building; without a recent enough setuptools, the line that says so."""
    problem = _setuptools_problem()
    if problem:
        print(problem, file=sys.stderr, flush=True)
        raise SystemExit(1)
    from setuptools import build_meta

    return build_meta


# The hooks that lead to a wheel (or an editable install) check first. pip with --no-build-isolation skips
# get_requires_*, so prepare_metadata_* and build_* check too (problems() is cached within a process).


def get_requires_for_build_sdist(config_settings=None):
    return _setuptools().get_requires_for_build_sdist(config_settings)


def build_sdist(sdist_directory, config_settings=None):
    return _setuptools().build_sdist(sdist_directory, config_settings)


def get_requires_for_build_wheel(config_settings=None):
    check()
    return _setuptools().get_requires_for_build_wheel(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    check()
    return _setuptools().prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    check()
    _say_what_skipping_gives_up()
    return _setuptools().build_wheel(wheel_directory, config_settings, metadata_directory)


def get_requires_for_build_editable(config_settings=None):
    check()
    return _setuptools().get_requires_for_build_editable(config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    check()
    return _setuptools().prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    check()
    _say_what_skipping_gives_up()
    return _setuptools().build_editable(wheel_directory, config_settings, metadata_directory)
