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

TORCH := torch==2.13.0
# nnU-Net v2, a development dependency (tests/integration/test_nnunet_agreement.py),
# and the libraries its fingerprint extraction, planner and dataset check import.
NNUNET := nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 batchgenerators==0.25.5 \
	acvl-utils==0.2.6
NNUNET_IMPORTS := numpy scipy pandas nibabel tqdm SimpleITK scikit-image blosc2

# The CPU build of torch is installed first so that the project install finds
# it satisfied and does not pull a multi-GB CUDA build. nnU-Net goes in last
# without its declared dependencies (they pull a CUDA torch through
# dynamic-network-architectures -> timm -> torchvision); what it imports is
# installed just before, constrained to the same torch.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	echo '$(TORCH)' > $(VENV)/constraints-cpu.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints-cpu.txt $(NNUNET_IMPORTS)
	$(BIN)/python -m pip install -q --no-deps $(NNUNET)
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
