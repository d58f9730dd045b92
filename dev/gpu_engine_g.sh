#!/bin/bash
# dev: kernel + engine GPU tests, the 7B graphed-step timeline, the 7B engine timing (PDL on)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
timeout 200 python -m pytest -x -q tests/test_int_weight_cuda.py tests/test_engine_ops.py tests/test_engine_gpu.py 2>&1 | tail -3
timeout 150 python dev/profile_engine.py w4a16 2>&1 | grep -v Warn | tee $OUT/profile.txt
PDL_MODES=1 timeout 200 python dev/engine7b_ab.py 2>&1 | grep -v Warn | tee $OUT/ab.txt
