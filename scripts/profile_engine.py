"""Where one graphed decode step of the Llama-2-7B-shaped model (random weights) spends its time: the
kernels of one CUDA-graph replay in order (torch.profiler / CUPTI start and end times), their durations
and the gaps before them, summed per kernel kind, then one layer's kernels in detail. Under
programmatic dependent launch the kernels overlap, so a kernel's share of the critical path is the
time from the previous kernel's end to its own.

    python scripts/profile_engine.py [float16] [w4a16] [w8a8-fp8+kv8] [--batch 1] [--context 256]

A model name ending in +kv8 keeps its KV cache in FP8 E4M3 (EngineConfig.kv_cache_dtype="fp8").
"""
import argparse

import torch

from bench_engine import BATCH_CHOICES, KV8, llama7b  # scripts/ is on sys.path when run as a script
from quantkit.engine.config import EngineConfig
from quantkit.engine.engine import Engine
from quantkit.engine.sequence import SamplingParams

KINDS = [("int_weight", "w4 gemm"), ("w8a8", "w8a8 gemm"), ("gemv", "cublas gemv"), ("gemm", "cublas gemm"),
         ("Kernel2", "cublas"), ("quant", "quantize"), ("add_rms_norm", "rms norm"), ("rope_cache", "rope+cache"),
         ("paged_attention", "attention"), ("silu_mul", "silu*up"), ("", "other")]

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("models", nargs="*", default=["float16", "w4a16"], choices=BATCH_CHOICES)
p.add_argument("--batch", type=int, default=1, help="sequences in the decode step")
p.add_argument("--context", type=int, default=256, help="positions each sequence holds before the step")
args = p.parse_args()
for which in args.models:
    weights = which.removesuffix(KV8)
    model = llama7b(weights)
    b, c = args.batch, args.context
    engine = Engine(model, EngineConfig(max_model_len=c + 64, max_num_seqs=max(b, 1), max_batched_tokens=b * c,
                                        kv_blocks=b * -(-(c + 64) // 16), kv_cache_dtype="fp8" if which.endswith(KV8)
                                        else "auto"))
    seqs = [engine.add(list(range(1 + i, c + 1 + i)), SamplingParams(max_tokens=64)) for i in range(b)]
    engine.step()  # prefill, allocates c + 1 positions a sequence
    for s in seqs:
        engine.blocks.append_slots(s, 1)
    x = engine._inputs(seqs, [len(s) - 1 for s in seqs], 1, [[1]] * b)
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
    for start, end, name in ks:
        kind = next(k for pat, k in KINDS if pat in name)
        d, g, crit, cnt = busy.get(kind, (0.0, 0.0, 0.0, 0))
        # critical: the part of the kernel after everything before it ended (under PDL a kernel starts early
        # and waits inside, so its duration includes the previous kernel's tail)
        busy[kind] = (d + (end - start), g + max(0.0, start - prev_end), crit + max(0.0, end - max(start, prev_end)),
                      cnt + 1)
        prev_end = max(prev_end, end)
    print(f"== {which}, batch {b}, context {c}: {n} kernels, first start to last end {span / 1e3:.3f} ms")
    print(f"{'kind':14s} {'count':>5s} {'kernel ms':>9s} {'critical ms':>11s} {'gap before ms':>13s} {'us/call':>8s}")
    for kind, (d, g, crit, cnt) in sorted(busy.items(), key=lambda kv: -kv[1][2]):
        print(f"{kind:14s} {cnt:5d} {d / 1e3:9.3f} {crit / 1e3:11.3f} {g / 1e3:13.3f} {d / cnt:8.2f}")
    print("one layer (the 10th kernel on), start offset / duration / critical us:")
    base, prev_end = ks[10][0], ks[9][1]
    for start, end, name in ks[10:22]:
        print(f"  {start - base:8.1f} {end - start:7.1f} {max(0.0, end - max(start, prev_end)):7.1f}  {name[:70]}")
        prev_end = max(prev_end, end)
    del engine, model, graph
    torch.cuda.empty_cache()
