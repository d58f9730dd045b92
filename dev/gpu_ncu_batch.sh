#!/bin/bash
# dev: ncu of the shared-x batch kernel at M=64 and M=1024 (28672x8192)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
timeout 250 ncu --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis -k regex:int_weight_batch -s 1 -c 3 python dev/profile_batch.py 64 1024 > $OUT/ncu_batch.txt 2>&1
grep -E "int_weight_batch|Duration|DRAM Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers|Warp Cycles Per Issued|Issue Slots Busy|Executed Ipc A|Stall|Pipe" $OUT/ncu_batch.txt | cut -c1-150 | head -60
