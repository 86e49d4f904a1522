# slaconv: `make demo` runs the whole pipeline on a built-in tiny model; `make test` runs the tests.
# Both set up a virtual environment first (torch is installed from its pinned CPU build before the
# package, so pip never pulls a multi-GB CUDA wheel on a machine without a GPU).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test test-kernels lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/slaconv demo --out demo --fresh

test: setup
	$(BIN)/pytest -q

test-kernels: setup
	TRITON_INTERPRET=1 $(BIN)/pytest -q tests/test_kernels.py

clean:
	rm -rf demo .pytest_cache build *.egg-info
