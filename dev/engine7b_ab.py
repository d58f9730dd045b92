"""Dev aid: the 7B-shaped engine with programmatic dependent launch off and on (PDL_MODES) and
asynchronous decoding off and on (ASYNC_MODES, the per-token times only), one process:
per-token time (128 + 128 tokens, batch 1), the graphed step with its input copies, and the bare
graph replay (CUDA events), float16 and W4A16."""
import os, sys, time, torch
sys.path.insert(0, "scripts")
from bench_engine import llama7b
from quantkit.kernels import cuda
from quantkit.engine.config import EngineConfig
from quantkit.engine.engine import Engine
from quantkit.engine.sequence import SamplingParams
from quantkit.engine.speed import Case, measure


def replay_ms(engine):
    seq = engine.add(list(range(1, 257)), SamplingParams(max_tokens=64))
    engine.step()
    engine.blocks.append_slots(seq, 1)
    x = engine._inputs([seq], [len(seq) - 1], 1, [[1]])
    t_step = []
    for _ in range(25):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        engine.target_step(x)
        torch.cuda.synchronize(); t_step.append(time.perf_counter() - t0)
    graph = next(iter(engine.target_step.graphs.values()))[0]
    t_rep = []
    for _ in range(25):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); graph.replay(); b.record(); b.synchronize(); t_rep.append(a.elapsed_time(b))
    med = lambda v: sorted(v)[len(v) // 2]
    return 1e3 * med(t_step), med(t_rep)


if __name__ == "__main__":
    rows = []
    for which in sys.argv[1:] or ["float16", "w4a16"]:
        model = llama7b(which)
        for pdl in [m == "1" for m in os.environ.get("PDL_MODES", "0 1").split()]:
            cuda.pdl_enabled = pdl
            for asy in [m == "1" for m in os.environ.get("ASYNC_MODES", "0").split()]:
                r = measure(model, list(range(100, 20000)), [Case(1, 128, 128)], EngineConfig(async_decode=asy))[0]
                print(f"{which:8s} pdl={int(pdl)} async={int(asy)} TPOT {r['tpot_ms_mean']:.3f} ms", flush=True)
            step, rep = replay_ms(Engine(model, EngineConfig(max_model_len=512, kv_blocks=64)))
            rows.append((which, pdl, r["tpot_ms_mean"], step, rep))
            print(f"{which:8s} pdl={int(pdl)} TPOT {r['tpot_ms_mean']:.3f} ms  step+inputs {step:.3f} ms  replay {rep:.3f} ms", flush=True)
        del model
        torch.cuda.empty_cache()
    base = {w: t for w, p, t, s, r in rows}
    for w, p, t, s, r in rows:
        print(f"| {w} | PDL {'on' if p else 'off'} | {t:.3f} | {s:.3f} | {r:.3f} | {base['float16'] / t if 'float16' in base else 0:.2f}x |")
