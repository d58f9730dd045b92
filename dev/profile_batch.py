"""Dev aid: the workload ncu profiles for the batch kernel: W4A16 g128 fp16 on 28672x8192 at the M given
(argv, default 64 1024), path "mma", two calls each."""
import sys, torch
from quantkit.formats import IntSpec, pack_int32
from quantkit.kernels import prepare_int_weight
from quantkit.kernels import int_weight_cuda as iwc

n, k = 28672, 8192
q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
sc = (torch.rand(n, k // 128, device="cuda") * 0.01 + 0.001).half()
w = prepare_int_weight(pack_int32(q, 4, 1), sc, None, None, IntSpec(4, True, 128), (n, k), backend="cuda")
for m in [int(a) for a in sys.argv[1:]] or [64, 1024]:
    x = torch.randn(m, k, device="cuda", dtype=torch.half)
    for _ in range(2):
        iwc._matmul(x, w, None, path="mma")
    torch.cuda.synchronize()
