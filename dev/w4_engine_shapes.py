"""Dev aid: the W4A16 decode kernel (M = 1) on the 7B layer shapes, graph-timed with rotating weights
(>= 200 MB per rotation, so L2 holds none), alone and after an RMSNorm as in the engine, with
programmatic dependent launch off / on and several least-steps-per-warp settings."""
import statistics, sys, torch
from quantkit.formats import IntSpec, pack_int32
from quantkit.kernels import prepare_int_weight, cuda, engine_ops
from quantkit.kernels import int_weight_cuda as iwc

def graph_us(fn, sets, calls=40):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3): fn(i % sets)
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls): fn(i % sets)
    for _ in range(3): g.replay()
    ts = []
    for _ in range(15):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) * 1000 / calls)
    return statistics.median(ts)

dev, dt = "cuda", torch.float16
shapes = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
mins = [int(a) for a in sys.argv[1:]] or [1, 2, 4, 8]
spec = IntSpec(4, True, 128)
print(torch.cuda.get_device_name())
total = {}
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
    ref = iwc._matmul(x, pw[0], None)
    row = f"{n}x{k} sets={sets}"
    for mn in mins:
        iwc.GEMV_MIN_STEPS_PER_WARP = mn
        err = float((iwc._matmul(x, pw[0], None).float() - ref.float()).norm() / ref.float().norm())
        for pdl in (False, True):
            cuda.pdl_enabled = pdl
            alone = graph_us(lambda i: iwc._matmul(x, pw[i], None), sets)
            paired = graph_us(lambda i: iwc._matmul(engine_ops.add_rms_norm(x, r, nw, 1e-5)[0], pw[i], None), sets)
            total[(mn, pdl)] = total.get((mn, pdl), 0.0) + paired
            row += f" | min{mn} pdl{int(pdl)} {alone:5.1f} / +norm {paired:5.1f}"
        row += f" e{err:.0e}"
    print(row, flush=True)
    del pw; torch.cuda.empty_cache()
print("per-layer sum (norm + gemv for each of the 4 shapes), us:",
      "  ".join(f"min{mn}/pdl{int(p)} {v:.1f}" for (mn, p), v in sorted(total.items())))
