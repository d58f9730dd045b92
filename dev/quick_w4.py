"""Dev aid: quick timing of the W4A16 CUDA paths vs fp16 on the big shapes (graph-timed, rotating weights).

python dev/quick_w4.py [M ...]: per shape and M, fp16 cuBLAS, then each decode-kernel variant (EPI, D, W) for
M <= 16, the batch (mma) kernel and the dense path, with speedups and effective weight bandwidth."""
import sys, torch
from graph_timing import graph_us
from quantkit.formats import IntSpec, pack_int32
from quantkit.kernels import prepare_int_weight, int_weight_matmul
from quantkit.kernels import int_weight_cuda as iwc

VARIANTS = {1: [(1, 2, 8, 0, 2, 0)], 2: [(1, 2, 8, 0, 2, 0)]}


dev = "cuda"; dt = torch.float16
shapes = [(28672, 8192), (8192, 28672), (11008, 4096), (4096, 4096)]
ms = [int(a) for a in sys.argv[1:]] or [1, 16, 64, 256, 1024]
bw_src = torch.empty(1 << 30, dtype=torch.uint8, device=dev); bw_dst = torch.empty_like(bw_src)
t = graph_us(lambda i: bw_dst.copy_(bw_src), 1, 10); copy_bw = 2 * (1 << 30) / t / 1e3
print(f"{torch.cuda.get_device_name()} copy {copy_bw:.0f} GB/s sms={torch.cuda.get_device_properties(0).multi_processor_count}")
del bw_src, bw_dst
for n, k in shapes:
    sets = 3
    spec = IntSpec(4, True, 128)
    ws16 = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(sets)]
    pw = []
    for i in range(sets):
        q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev)
        sc = (torch.rand(n, k // 128, device=dev) * 0.01 + 0.001).to(dt)
        pw.append(prepare_int_weight(pack_int32(q, 4, 1), sc, None, None, spec, (n, k), backend="cuda"))
    ref = prepare_int_weight(pack_int32(q, 4, 1), sc, None, None, spec, (n, k), backend="reference")
    wbytes = n * k / 2 + n * k // 128 * 2
    for m in ms:
        xs = [torch.randn(m, k, device=dev, dtype=dt) for _ in range(sets)]
        yr = int_weight_matmul(xs[-1], ref).float()
        t16 = graph_us(lambda i: torch.nn.functional.linear(xs[i], ws16[i]), sets)
        row = f"{n}x{k} M={m:5d} fp16 {t16:7.1f}us"
        runs = []
        if m <= 16:
            runs += [("g" + "".join(map(str, v[1:])), dict(path="gemv", variant=v)) for v in VARIANTS[1 if m <= 8 else 2]]
        if m > 1:
            runs.append(("mma", dict(path="mma")))
        if m >= 64:
            runs.append(("dense", dict(path="dense")))
        for label, kw in runs:
            err = float((iwc._matmul(xs[-1], pw[-1], None, **kw).float() - yr).norm() / yr.norm())
            tq = graph_us(lambda i: iwc._matmul(xs[i], pw[i], None, **kw), sets)
            row += f" | {label} {tq:5.1f} x{t16/tq:4.2f} e{err:.0e}"
        print(row, flush=True)
    del ws16, pw, ref, xs; torch.cuda.empty_cache()
