#!/bin/bash
# dev: GPU tests of the int-weight kernels, then the batch-kernel A/B timing (old ring kernel "v1" vs shared-x "mma")
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
timeout 240 python -m pytest -x -q tests/test_int_weight_cuda.py 2>&1 | tail -6
timeout 300 python dev/quick_w4.py ${@:-16 32 64 128 256 1024} 2>&1 | tail -40
