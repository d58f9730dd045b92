#!/bin/bash
# dev: call A — park the model's first half, profile the M=1 kernel, run the kernel table
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
mkdir -p ~/qk && cp gpu/gguf.part.aa ~/qk/
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader | tee $OUT/gpu.txt
if command -v ncu >/dev/null; then
  timeout 120 ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis -k regex:int_weight_gemv -s 2 -c 1 python dev/profile_m1.py > $OUT/ncu.txt 2>&1
  grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers|Stall|Warp Cycles Per Issued|Issue Slot|Block Limit" $OUT/ncu.txt | head -30
else echo "no ncu"; fi
timeout 420 python scripts/bench_kernels.py --json-out $OUT/kernels.json > $OUT/kernels.txt 2>&1; echo rc=$?
tail -c 9000 $OUT/kernels.txt
