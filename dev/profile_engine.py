"""Dev aid: the kernels of one un-graphed decode step (batch 1, context 256) of the 7B-shaped model,
float16 and W4A16, by total CUDA time (torch.profiler)."""
import sys, torch
sys.path.insert(0, "scripts")
from bench_engine import llama7b
from quantkit.engine.config import EngineConfig
from quantkit.engine.engine import Engine
from quantkit.engine.sequence import SamplingParams

for which in ("float16", "w4a16"):
    model = llama7b(which)
    engine = Engine(model, EngineConfig(max_model_len=512, kv_blocks=64, cuda_graphs=False))
    seq = engine.add(list(range(1, 257)), SamplingParams(max_tokens=64))
    engine.step()
    engine.blocks.append_slots(seq, 1)
    args = engine._inputs([seq], [len(seq) - 1], 1)
    tokens = torch.ones(1, 1, dtype=torch.long, device="cuda")
    for _ in range(3):
        engine.runner.decode(tokens, *args)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.runner.decode(tokens, *args)
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events)
    print(f"== {which}: {total / 1e3:.2f} ms of kernel time in one step, {sum(e.count for e in events)} kernels")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:14]:
        print(f"{e.device_time_total / 1e3:8.3f} ms {e.count:5d}x  {e.key[:90]}")
    del engine, model
    torch.cuda.empty_cache()
