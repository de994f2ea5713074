#!/usr/bin/env bash
# The benchmark table on a GPU machine that already has jax[cuda], torch and this project's
# Python dependencies: installs nothing. Usage: benchmarks/gpu.sh OUT_DIR
# Writes OUT_DIR/<gpu>.json and .md. Sized to finish in under 8 minutes on one H100/H200.
set -euo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and JAX share the GPU in one process
python -m benchmarks --out "$out" --batches 32 128 512 --repeats 5 --images-per-repeat 2048 \
  --ddim-images 64 --ddpm-images 256 --sample-repeats 3
