"""Build script: packages, plus the native extension ``prunenet._C`` built by CMake (CMakeLists.txt).

Install with ``pip install --no-build-isolation .`` (or ``-e .``). ``--no-build-isolation`` is needed
because the extension is compiled and linked against torch's C++ libraries and must match, exactly,
the torch that will import it: in an isolated build environment pip would download a second (multi-GB,
possibly different-version) torch just to build against it, and the result could fail to load.

Environment variables:
  PRUNENET_SKIP_EXT=1   no native build at all; the package still works (pure-PyTorch fallbacks).
  PRUNENET_SKIP_CUDA=1  build the CPU-only extension even where a CUDA build would be possible.
  CUDA_HOME             CUDA toolkit to use (default: /usr/local/cuda, else the nvcc on PATH).
  MAX_JOBS              parallel compile jobs (default 2).
  CMAKE_ARGS            extra arguments for the CMake configure step.

The CUDA kernels (csrc/*.cu, for sm_80 and sm_90) are compiled only when torch is a CUDA build, a CUDA
toolkit (nvcc) is found, its major version matches torch's, and PRUNENET_SKIP_CUDA is not 1.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension with no sources of its own: ``CMakeBuild`` runs CMake on ``sourcedir``."""

    def __init__(self, name: str, sourcedir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


def _cuda_home() -> Path | None:
    """The CUDA toolkit root (the folder with bin/nvcc and include/cuda_runtime.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:  # may be a wrapper script (e.g. /usr/local/bin/nvcc): only trust a real toolkit layout
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").is_file() and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home)
    return None


def _nvcc_version(home: Path) -> str | None:
    try:
        out = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _cuda_variant(torch) -> tuple[Path | None, str]:
    """(CUDA toolkit to compile with, or None for the CPU-only variant; the reason, for the log)."""
    if os.environ.get("PRUNENET_SKIP_CUDA") == "1":
        return None, "PRUNENET_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    home = _cuda_home()
    if home is None:
        return None, "no CUDA toolkit found (set CUDA_HOME to the folder with bin/nvcc)"
    nvcc = _nvcc_version(home)
    if nvcc is None or nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
        return None, f"nvcc {nvcc} in {home} does not match torch's CUDA {torch.version.cuda}"
    return home, f"nvcc {nvcc} in {home}, torch {torch.__version__} (CUDA {torch.version.cuda}), sm_80 + sm_90"


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11
        import torch

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError(
                "building prunenet._C needs cmake >= 3.18 and a C++17 compiler "
                "(or set PRUNENET_SKIP_EXT=1 to install without the native extension)"
            )
        cuda_home, why = _cuda_variant(torch)
        print(f"prunenet: building the {'CUDA' if cuda_home else 'CPU-only'} variant of prunenet._C ({why})")

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_type = "Debug" if self.debug else "Release"
        torch_dir = Path(torch.__file__).resolve().parent
        # find_package(Torch) is used for a CPU torch and for the CUDA variant. For the CPU-only variant
        # against a CUDA torch, CMake takes torch's CPU libraries by path instead: torch's CMake config
        # would insist on a (matching) CUDA toolkit that this variant does not use.
        find_torch = torch.version.cuda is None or cuda_home is not None
        args = [
            f"-S{ext.sourcedir}",
            f"-B{build_dir}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPRUNENET_OUTPUT_DIR={ext_path.parent}",
            f"-DPRUNENET_EXT_SUFFIX={ext_path.name[len('_C') :]}",
            f"-DPRUNENET_WITH_CUDA={'ON' if cuda_home else 'OFF'}",
            f"-DPRUNENET_FIND_TORCH={'ON' if find_torch else 'OFF'}",
            f"-DPRUNENET_TORCH_DIR={torch_dir}",
            f"-DPRUNENET_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DPRUNENET_TORCH_VERSION={torch.__version__}",
        ]
        if cuda_home:
            args += [f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}", f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}"]
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = os.environ.get("MAX_JOBS", "2")

        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([cmake, *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--config", build_type, "--parallel", jobs], check=True)
        if not ext_path.is_file():
            raise RuntimeError(f"CMake finished but {ext_path} was not produced")


if os.environ.get("PRUNENET_SKIP_EXT") == "1":
    print("prunenet: PRUNENET_SKIP_EXT=1, not building the native extension (pure-PyTorch fallbacks only)")
    ext_modules = []
else:
    ext_modules = [CMakeExtension("prunenet._C")]

setup(
    packages=["prunenet", "prunenet.adapters", "prunenet.kernels"],
    package_dir={"prunenet.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
