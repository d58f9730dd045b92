#!/bin/bash
# dev: call A — park the model's first half, profile the M=1 kernel, run the kernel table
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
mkdir -p ~/qk && cp gpu/gguf.part.aa ~/qk/
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader | tee $OUT/gpu.txt
cat > /tmp/one.py <<'PY'
import torch
from quantkit.formats import IntSpec, pack_int32
from quantkit.kernels import prepare_int_weight, int_weight_matmul
n, k = 28672, 8192
q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
sc = (torch.rand(n, k // 128, device="cuda") * 0.01 + 0.001).half()
w = prepare_int_weight(pack_int32(q, 4, 1), sc, None, None, IntSpec(4, True, 128), (n, k), backend="cuda")
x = torch.randn(1, k, device="cuda", dtype=torch.half)
for _ in range(3): int_weight_matmul(x, w)
torch.cuda.synchronize()
PY
if command -v ncu >/dev/null; then
  timeout 120 ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis -k regex:int_weight_gemv -s 2 -c 1 python /tmp/one.py > $OUT/ncu.txt 2>&1
  grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers|Stall|Warp Cycles Per Issued|Issue Slot|Block Limit" $OUT/ncu.txt | head -30
else echo "no ncu"; fi
timeout 420 python scripts/bench_kernels.py --json-out $OUT/kernels.json > $OUT/kernels.txt 2>&1; echo rc=$?
tail -c 9000 $OUT/kernels.txt
