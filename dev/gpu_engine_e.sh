#!/bin/bash
# dev: PDL correctness (engine-op, int-weight and engine GPU tests), the 7B engine A/B, the shape sweep, the profile
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 150 python -m pytest -x -q tests/test_engine_ops.py tests/test_engine_gpu.py $(ls tests/test_*cuda*.py tests/test_int_weight*.py 2>/dev/null) 2>&1 | tail -3
timeout 120 python dev/w4_engine_shapes.py 1 2 4 2>&1 | grep -v Warn | tee $OUT/shapes.txt
timeout 280 python dev/engine7b_ab.py 2>&1 | grep -v Warn | tee $OUT/ab.txt
