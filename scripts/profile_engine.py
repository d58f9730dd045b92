"""Where one graphed decode step of the Llama-2-7B-shaped model (random weights, batch 1, context 256)
spends its time, float16 and W4A16 g128 (H200-class GPU, CuPy): the kernels of one CUDA-graph replay
in order (torch.profiler / CUPTI start and end times), their durations and the gaps before them, summed
per kernel kind, then one layer's kernels in detail. Under programmatic dependent launch the kernels
overlap, so a kernel's share of the critical path is the time from the previous kernel's end to its own.

    python scripts/profile_engine.py [float16] [w4a16]
"""
import sys

import torch

from bench_engine import llama7b  # scripts/ is on sys.path when run as a script
from quantkit.engine.config import EngineConfig
from quantkit.engine.engine import Engine
from quantkit.engine.sequence import SamplingParams

KINDS = [("int_weight_gemv", "w4 gemv"), ("gemv", "cublas gemv"), ("gemm", "cublas gemm"), ("Kernel2", "cublas"),
         ("add_rms_norm", "rms norm"), ("rope_cache", "rope+cache"), ("paged_attention", "attention"),
         ("silu_mul", "silu*up"), ("", "other")]

for which in sys.argv[1:] or ("float16", "w4a16"):
    model = llama7b(which)
    engine = Engine(model, EngineConfig(max_model_len=512, kv_blocks=64))
    seq = engine.add(list(range(1, 257)), SamplingParams(max_tokens=64))
    engine.step()
    engine.blocks.append_slots(seq, 1)
    x = engine._inputs([seq], [len(seq) - 1], 1, [[1]])
    for _ in range(3):
        engine.target_step(x)
    graph = next(iter(engine.target_step.graphs.values()))[0]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    ks = sorted([(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA], key=lambda t: t[0])
    n = len(ks) // 3
    ks = ks[-n:]  # the last replay
    span = ks[-1][1] - ks[0][0]
    busy = {}
    prev_end = ks[0][0]
    for a, b, name in ks:
        kind = next(k for pat, k in KINDS if pat in name)
        d, g = busy.get(kind, (0.0, 0.0, 0))[:2]
        c = busy.get(kind, (0, 0, 0))[2]
        busy[kind] = (d + (b - a), g + max(0.0, a - prev_end), c + 1)
        prev_end = max(prev_end, b)
    print(f"== {which}: {n} kernels, first start to last end {span / 1e3:.3f} ms")
    print(f"{'kind':14s} {'count':>5s} {'kernel ms':>9s} {'gap before ms':>13s} {'us/call':>8s}")
    for kind, (d, g, c) in sorted(busy.items(), key=lambda kv: -kv[1][0]):
        print(f"{kind:14s} {c:5d} {d / 1e3:9.3f} {g / 1e3:13.3f} {d / c:8.2f}")
    print("one layer (the 10th kernel on), start offset / duration us:")
    base = ks[10][0]
    for a, b, name in ks[10:22]:
        print(f"  {a - base:8.1f} {b - a:7.1f}  {name[:70]}")
    del engine, model, graph
    torch.cuda.empty_cache()
