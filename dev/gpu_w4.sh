#!/bin/bash
# dev: compile report + GPU tests + quick timing of the W4A16 kernel
set -x
cd "$(dirname "$0")/.."
nvcc --version | tail -1
nvcc -cubin -std=c++17 -arch=sm_90 -Xptxas -v csrc/int_weight_mma.cu -o $OUT/iw.cubin 2> $OUT/ptxas.txt; echo rc=$?
grep -E "Compiling entry|registers|spill" $OUT/ptxas.txt | paste - - - | grep -E "f16_b4_sym_nt|f16_b4_asym_nt1|dequant_f16_b4_sym" | sed 's/ptxas info    ://g' | cut -c1-220
cuobjdump -sass $OUT/iw.cubin > $OUT/sass.txt 2>/dev/null; grep -c HMMA $OUT/sass.txt
timeout 300 python -m pytest -x -q tests/test_int_weight_cuda.py -k "not every_format" 2>&1 | tail -15
timeout 200 python dev/quick_w4.py "$@" 2>&1 | tail -30
