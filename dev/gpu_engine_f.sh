#!/bin/bash
# dev: engine GPU tests, the 7B graphed-step timeline, the 7B engine A/B (PDL off / on)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
timeout 150 python -m pytest -x -q tests/test_engine_gpu.py tests/test_engine.py tests/test_engine_ops.py 2>&1 | tail -3
timeout 200 python dev/profile_engine.py 2>&1 | grep -v Warn | tee $OUT/profile.txt
timeout 240 python dev/engine7b_ab.py 2>&1 | grep -v Warn | tee $OUT/ab.txt
