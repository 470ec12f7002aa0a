# Set-up and the two entry points of README.md: `make bench` (the main job) and `make test`.
# Everything goes into a virtual environment; torch is pinned to the CPU build on local disk
# (a bare `torch` would resolve to a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PINS ?= torch==2.13.0 triton==3.8.0
# The trainers and loggers the examples and tests/test_trainers.py use; none of them makes pip
# resolve another torch beside the pinned one (checked: `pip install --dry-run $(PINS) $(TOOLS)`).
TOOLS ?= "setuptools>=77" ninja numpy pytest hypothesis expecttest matplotlib tensorboard tqdm transformers accelerate pytorch-lightning
# Peers `pyeff bench optim_state` measures against (8-bit AdamW); --no-deps, as they would only
# ask for the torch already pinned. Optional: a benchmark skips a peer that is missing.
PEERS ?= torchao bitsandbytes
export MAX_JOBS ?= 2

.PHONY: setup build bench bench-full test cuda-build-check clean

$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PINS) $(TOOLS)
	$(BIN)/python -m pip install -q --no-deps $(PEERS) || echo "benchmark peers not installed: $(PEERS)"
	touch $@

setup: $(VENV)/.deps

# --no-build-isolation: compile against the pinned torch above; --no-deps: resolve nothing else.
build: setup
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .

bench: build
	$(BIN)/pyeff info
	$(BIN)/pyeff bench --quick

bench-full: build
	$(BIN)/pyeff bench

test: build
	$(BIN)/python -m pytest -q

# pyeff._C with its CUDA kernels, built against a CUDA torch in .venv-cuda and imported (no GPU needed)
cuda-build-check:
	bash scripts/cuda_build_check.sh

clean:
	rm -rf build pyeff/_C*.so *.egg-info benchmarks/out .venv-cuda
