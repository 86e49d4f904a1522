# slaconv: `make demo` runs the whole pipeline on a built-in tiny model; `make test` runs the tests.
# Both set up a virtual environment first (torch is installed from its pinned CPU build before the
# package, so pip never pulls a multi-GB CUDA wheel on a machine without a GPU).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo demo-trained test test-kernels lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/slaconv demo --out demo --fresh

# The same pipeline on a model that has learned something: the quality benchmark's shipped DiT (13 MB), on
# single 64x64 frames (1,024 tokens; it was trained on them too), 75% sparsity, a few minutes on a CPU.
demo-trained: setup
	$(BIN)/python -m slaconv.quality.table --model benchmarks/quality/checkpoint/model \
	    --classifier benchmarks/quality/checkpoint/classifier --out demo-trained --rows main --frames 1 \
	    --topk 0.25 --block-q 64 --stage1-steps 40 --stage2-steps 30 --stage2-batch-size 2 --calib-samples 32 \
	    --heldout-samples 8 --sample-per-class 1 --sample-steps 8 --device cpu

# TRITON36=1 (CI sets it): also compile every kernel for sm_90 with Triton 3.6, the version on the GPU machines,
# in a second small environment (tests/test_kernel_codegen.py); without it that check is skipped, and says so.
TRITON36_VENV := .venv-triton36
ifeq ($(TRITON36),1)
TEST_DEPS := $(TRITON36_VENV)/.installed
export SLACONV_TRITON36_PYTHON := $(abspath $(TRITON36_VENV))/bin/python
endif

$(TRITON36_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION) triton==3.6.0 numpy
	touch $@

test: setup $(TEST_DEPS)
	$(BIN)/pytest -q

test-kernels: setup
	TRITON_INTERPRET=1 $(BIN)/pytest -q tests/test_kernels.py

clean:
	rm -rf demo demo-trained .pytest_cache build *.egg-info
