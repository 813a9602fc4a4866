#!/usr/bin/env bash
# Validate and measure the Triton kernels on a CUDA machine in one command (see gpu_suite.py):
#   bash bench/gpu_suite.sh OUT_DIR [--steps ...] [--budget-s ...]
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_suite.py "$@"
