#!/usr/bin/env bash
# One prepared run on a CUDA machine: the gpu-marked tests, then the model
# step benchmark at the demo and a realistic patch. Writes to $OUT when set.
set -uo pipefail
out=${OUT:-/tmp/moefl-gpu}
mkdir -p "$out"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 PYTHONUNBUFFERED=1 \
  PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
python3 -m simulations.benchmarks.model_step --full --steps 5 --json "$out/model_step.json" \
  2>&1 | tee "$out/model_step.log"
