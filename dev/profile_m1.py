"""Dev aid: the workload ncu profiles (dev/gpu_w4.sh, dev/gpu_call_a.sh): W4A16 g128 fp16, M=1, on the
28672x8192 and 8192x28672 shapes, three calls each (ncu -s / -c pick which are captured)."""
import torch
from quantkit.formats import IntSpec, pack_int32
from quantkit.kernels import prepare_int_weight, int_weight_matmul

for n, k in [(28672, 8192), (8192, 28672)]:
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
    sc = (torch.rand(n, k // 128, device="cuda") * 0.01 + 0.001).half()
    w = prepare_int_weight(pack_int32(q, 4, 1), sc, None, None, IntSpec(4, True, 128), (n, k), backend="cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.half)
    for _ in range(3):
        int_weight_matmul(x, w)
    torch.cuda.synchronize()
