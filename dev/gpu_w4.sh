#!/bin/bash
# dev: compile report (registers, SASS of the decode kernel) + GPU tests + quick timing + ncu of the M=1 decode kernel
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
nvcc -cubin -std=c++17 -arch=sm_90 -Xptxas -v csrc/int_weight_mma.cu -o $OUT/iw.cubin 2> $OUT/ptxas.txt; echo nvcc rc=$?
grep -E "Compiling entry|registers|spill" $OUT/ptxas.txt | paste - - - | grep -E "f16_b4_sym" | sed 's/ptxas info    ://g' | cut -c1-200 | grep -o "int_weight_[a-z0-9_]*\|Used [0-9]* registers\|[0-9]* bytes spill stores" | paste - - - | head -20
cuobjdump -sass -fun int_weight_gemv_f16_b4_sym_nt1_s1_e1_d2_w8_x0_b2 $OUT/iw.cubin > $OUT/sass_gemv.txt 2>&1
cuobjdump -sass -fun int_weight_mma_f16_b4_sym_nt1 $OUT/iw.cubin > $OUT/sass_mma.txt 2>&1
for f in gemv mma; do echo "$f: $(grep -cE '^\s+/\*[0-9a-f]+\*/' $OUT/sass_$f.txt) instr, HMMA $(grep -c HMMA $OUT/sass_$f.txt), LDG $(grep -c LDG $OUT/sass_$f.txt), LOP3 $(grep -c LOP3 $OUT/sass_$f.txt), HFMA2/HADD2/HMUL2 $(grep -cE 'HFMA2|HADD2|HMUL2' $OUT/sass_$f.txt)"; done
timeout 200 python dev/quick_w4.py "${@:-1}" 2>&1 | tail -20
timeout 200 python -m pytest -x -q tests/test_int_weight_cuda.py 2>&1 | tail -6
if [ -n "$NCU" ] && command -v ncu >/dev/null; then
  timeout 150 ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats -k regex:int_weight_gemv -s 2 -c 1 python dev/profile_m1.py > $OUT/ncu.txt 2>&1
  grep -E "Duration|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Theoretical Occupancy|Registers|Warp Cycles Per Issued|Issue Slot|Block Limit|Grid Size|Stall" $OUT/ncu.txt | head -24
fi
