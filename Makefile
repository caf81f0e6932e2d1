# kvos developer commands. Every target creates and uses the virtual environment
# in .venv itself, so a fresh clone needs nothing but Python 3.10+ and a C compiler.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvos-installed
# torch first, as its CPU build from the local wheel cache; GPU users bring their own.
TORCH_SPEC ?= torch==2.13.0
# One thread pool: torch and the C kernels share these threads.
export KVOS_THREADS ?= 2

CSRC := $(wildcard csrc/cpu/*.c csrc/cpu/*.h csrc/common/*.h csrc/cpu/*.py)

.PHONY: demo test test-fast bench bench-ops bench-mm bench-sched gpu-check lint clean install

install: $(STAMP)

$(STAMP): setup.py pyproject.toml $(CSRC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvos demo

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/kvos bench

bench-ops: $(STAMP)
	$(BIN)/python benchmarks/bench_ops.py

bench-sched: $(STAMP)
	$(BIN)/python benchmarks/bench_sched.py

bench-mm: $(STAMP)
	$(BIN)/python benchmarks/bench_mm.py

gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info kernel/ops/_kvos_cpu*.so
