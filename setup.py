"""Build script: packages, plus the native extension ``prunenet._C`` built by CMake (CMakeLists.txt).

Install with ``pip install --no-build-isolation .`` (or ``-e .``) once torch is installed.
``--no-build-isolation`` is needed because the extension is compiled and linked against torch's C++
libraries and must match the torch that will import it: pip's isolated build environment cannot see
the installed torch (and listing torch as a build requirement would download a second, multi-GB torch,
possibly another version, just to build against). pybind11 is no separate requirement: CMake takes the
headers torch ships. The build backend (build_backend/prunenet_build.py) checks every prerequisite
first and names what is missing, one line each.

Environment variables:
  PRUNENET_SKIP_EXT=1    no native build at all; the package still works (pure-PyTorch slicing).
  PRUNENET_SKIP_CUDA=1   build the CPU-only extension even where a CUDA build would be possible.
  PRUNENET_FORCE_CUDA=1  the CUDA variant or an error (default: CPU-only when no CUDA toolkit is found).
  CUDA_HOME              CUDA toolkit to use (default: /usr/local/cuda, else the nvcc on PATH).
  TORCH_CUDA_ARCH_LIST   GPU architectures of the CUDA variant (default "8.0;9.0+PTX": sm_80 and sm_90
                         cubins, compute_90 PTX), as torch.utils.cpp_extension takes it.
  MAX_JOBS               parallel compile jobs (default 2).
  CMAKE_ARGS             extra arguments for the CMake configure step.

The CUDA kernels (csrc/*.cu) are compiled only when torch is a CUDA build, a CUDA toolkit (nvcc) is
found, and PRUNENET_SKIP_CUDA is not 1; a toolkit whose major version is not torch's stops the build.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# The build backend's checks and tool lookups (already imported when pip runs the backend; this makes
# them importable for a direct `python setup.py ...` too).
sys.path.insert(0, str(ROOT / "build_backend"))
import prunenet_build  # noqa: E402


class CMakeExtension(Extension):
    """An extension with no sources of its own: ``CMakeBuild`` runs CMake on ``sourcedir``."""

    def __init__(self, name: str, sourcedir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        prunenet_build.check()  # one line per missing prerequisite, and exit, instead of a traceback below
        import torch

        cmake = prunenet_build.cmake()
        cuda_home, why, _ = prunenet_build.cuda_variant(torch)
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
        for what, cmd in (
            ("configure", [cmake, *args]),
            ("build", [cmake, "--build", str(build_dir), "--config", build_type, "--parallel", jobs]),
        ):
            # CMake has printed what went wrong; a Python traceback on top would only bury it.
            if subprocess.run(cmd).returncode != 0:
                raise SystemExit(f"prunenet: the CMake {what} step of prunenet._C failed (its output is above)")
        if not ext_path.is_file():
            raise SystemExit(f"prunenet: CMake finished but {ext_path} was not produced")


# PRUNENET_SKIP_EXT=1: no extension (the build backend says so, once, when it builds the wheel).
ext_modules = [] if os.environ.get("PRUNENET_SKIP_EXT") == "1" else [CMakeExtension("prunenet._C")]

setup(
    packages=["prunenet", "prunenet.adapters", "prunenet.kernels"],
    package_dir={"prunenet.kernels": "prunenet_kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
