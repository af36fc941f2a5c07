# moefl: two set-up commands on a fresh machine, `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_run
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: venv demo test test-all bench lint clean

venv: $(STAMP)

# The CPU build of torch is installed first so that the project install finds
# it satisfied and does not pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/moefl demo --out $(DEMO_DIR)

test: venv
	$(BIN)/python -m pytest -m "not gpu" -q

test-all: venv
	$(BIN)/python -m pytest -q

# Quick versions of the benchmark suite (tiny cohort; minutes). The full
# suite behind docs/benchmarks.md: `$(BIN)/python -m simulations.benchmarks`.
bench: venv
	$(BIN)/python -m simulations.benchmarks --quick --out runs/bench

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
