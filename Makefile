# slaconv: `make demo` runs the whole pipeline on a built-in tiny model; `make test` runs the tests.
# Both set up a virtual environment first (torch is installed from its pinned CPU build before the
# package, so pip never pulls a multi-GB CUDA wheel on a machine without a GPU). Every package is
# installed at the version constraints.txt pins, so the versions the tests ran with are the ones installed;
# `make lock` refreshes that file from the newest versions pyproject.toml's ranges allow.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
LOCK := constraints.txt
EXTRAS := test,lint

.PHONY: setup demo demo-trained test test-kernels lint lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) --upgrade pip
	$(BIN)/python -m pip install -q -c $(LOCK) torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
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
TRITON36_LOCK := constraints-triton36.txt
TRITON36_PACKAGES := torch==$(TORCH_VERSION) triton==3.6.0 numpy
ifeq ($(TRITON36),1)
TEST_DEPS := $(TRITON36_VENV)/.installed
export SLACONV_TRITON36_PYTHON := $(abspath $(TRITON36_VENV))/bin/python
endif

$(TRITON36_VENV)/.installed: $(TRITON36_LOCK)
	$(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -m pip install -q -c $(TRITON36_LOCK) $(TRITON36_PACKAGES)
	touch $@

test: setup $(TEST_DEPS)
	$(BIN)/pytest -q

test-kernels: setup
	TRITON_INTERPRET=1 $(BIN)/pytest -q tests/test_kernels.py

# Lint only; `ruff format` is not used on this tree.
lint: setup
	$(BIN)/ruff check .

# Re-resolve both lock files in throw-away environments: torch first (the CPU build), then the rest with no
# pins, then `pip freeze` without the project itself and with local version labels such as +cpu removed.
LOCK_HEADER = echo "\# Exact versions $(1). Made by \`make lock\`: $(2), then pip freeze"; \
	echo "\# --exclude-editable with local version labels (+cpu) removed. Do not edit by hand."
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	freeze() { py="$$1/bin/python"; \
	    $$py -c 'import platform as p; print(f"# Resolved with Python {p.python_version()} on {p.system()} {p.machine()}.")'; \
	    echo "pip==$$($$py -m pip --version | cut -d' ' -f2)"; \
	    $$py -m pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//'; }; \
	$(PYTHON) -m venv $$tmp/main; \
	$$tmp/main/bin/python -m pip install -q --upgrade pip; \
	$$tmp/main/bin/python -m pip install -q torch==$(TORCH_VERSION); \
	$$tmp/main/bin/python -m pip install -q -e ".[$(EXTRAS)]"; \
	{ $(call LOCK_HEADER,that make setup installs,torch==$(TORCH_VERSION) first then pip install -e '.[$(EXTRAS)]'); \
	  freeze $$tmp/main; } > $$tmp/main.lock; \
	$(PYTHON) -m venv $$tmp/triton36; \
	$$tmp/triton36/bin/python -m pip install -q --upgrade pip; \
	$$tmp/triton36/bin/python -m pip install -q $(TRITON36_PACKAGES); \
	{ $(call LOCK_HEADER,of the Triton 3.6 environment of make test TRITON36=1,pip install $(TRITON36_PACKAGES)); \
	  freeze $$tmp/triton36; } > $$tmp/triton36.lock; \
	mv $$tmp/main.lock $(LOCK); mv $$tmp/triton36.lock $(TRITON36_LOCK)

clean:
	rm -rf demo demo-trained .pytest_cache build *.egg-info
