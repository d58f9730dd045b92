#!/bin/bash
# dev: the SiLU prologue of the decode kernel (tests, on/off A/B at the 7B shape, the W4 step's
# kernel timeline) and the TTFT probe; no real model needed.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
timeout 200 python -m pytest -x -q tests/test_int_weight_cuda.py -k "silu" 2>&1 | tail -2
timeout 200 python dev/silu_ab.py 2>&1 | grep -v Warn | tee $OUT/silu_ab.txt
timeout 60 python dev/profile_engine.py w4a16 > $OUT/profile.txt 2>&1; tail -14 $OUT/profile.txt
timeout 90 python dev/ttft_probe.py > $OUT/ttft.txt 2>&1; grep "pdl=" $OUT/ttft.txt
