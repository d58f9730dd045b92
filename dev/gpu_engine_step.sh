#!/bin/bash
# dev: the new kernel paths' GPU tests, then the 7B engine timing (PDL on) and the step timeline
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
timeout 250 python -m pytest -x -q tests/test_engine_ops.py tests/test_engine_gpu.py tests/test_int_weight_cuda.py -k "fused or row_block or early or split or paged or engine or graphed or quantized" 2>&1 | tail -2
PDL_MODES=1 timeout 200 python dev/engine7b_ab.py 2>&1 | grep -v Warn | tee $OUT/ab.txt
timeout 100 python dev/profile_engine.py w4a16 2>&1 | grep -v Warn | tail -14 | tee $OUT/profile.txt
