"""Dev aid: decode-kernel variants (M = 1) on the 7B layer shapes, graph-timed with rotating weights
(>= 200 MB per rotation, so L2 holds none), each launch after the small op that precedes it in the
engine (RMSNorm before q/k/v, o and gate/up; SiLU * up before down), with programmatic dependent
launch on. Variant = (EPI, D, W, XP, MB, RBK) as in quantkit.kernels.int_weight_cuda.GEMV."""
import torch
from graph_timing import graph_us
from quantkit.formats import IntSpec, pack_int32
from quantkit.kernels import prepare_int_weight, engine_ops
from quantkit.kernels import int_weight_cuda as iwc

# the instantiated ones (the deeper-prefetch row-block variants of csrc/NOTES.md were measured and removed)
VARIANTS = [(1, 2, 8, 0, 2, 0), (1, 2, 8, 0, 2, 1), (1, 2, 16, 0, 1, 1), (1, 2, 4, 0, 4, 1)]


dev, dt = "cuda", torch.float16
shapes = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
spec = IntSpec(4, True, 128)
print(torch.cuda.get_device_name(), "| variant = (EPI, D, W, XP, MB, RBK) | us per (small op + gemv), error vs stream-K")
best = {}
for n, k in shapes:
    wbytes = n * k / 2 + n * k // 128 * 2
    sets = max(3, int(-(-200e6 // wbytes)))
    pw = []
    for i in range(sets):
        q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev)
        sc = (torch.rand(n, k // 128, device=dev) * 0.01 + 0.001).to(dt)
        pw.append(prepare_int_weight(pack_int32(q, 4, 1), sc, None, None, spec, (n, k), backend="cuda"))
    x = torch.randn(1, k, device=dev, dtype=dt)
    r = torch.randn(1, k, device=dev, dtype=dt)
    nw = torch.ones(k, device=dev, dtype=dt)
    gu = torch.randn(1, 2 * k, device=dev, dtype=dt)
    pre = (lambda: engine_ops.silu_mul(gu[:, :k], gu[:, k:])) if k > 8192 else (lambda: engine_ops.add_rms_norm(x, r, nw, 1e-5)[0])
    ref = iwc._matmul(x, pw[0], None, path="gemv", variant=VARIANTS[0]).float()
    print(f"{n}x{k} ({wbytes / 1e6:.1f} MB, sets={sets}):", flush=True)
    for v in VARIANTS:
        err = float((iwc._matmul(x, pw[0], None, path="gemv", variant=v).float() - ref).norm() / ref.norm())
        alone = graph_us(lambda i: iwc._matmul(x, pw[i], None, path="gemv", variant=v), sets)
        paired = graph_us(lambda i: iwc._matmul(pre(), pw[i], None, path="gemv", variant=v), sets)
        print(f"   {v}: alone {alone:6.1f}  after op {paired:6.1f}  ({wbytes / paired / 1e3:5.2f} TB/s)  err {err:.1e}", flush=True)
        best.setdefault((n, k), []).append((paired, v))
    del pw; torch.cuda.empty_cache()
for key, rows in best.items():
    print(key, "best:", min(rows))
