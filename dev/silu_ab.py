"""Dev aid: the decode kernel's SiLU prologue on and off (silu_mul's own kernel before the down
projection), 7B-shaped W4A16, one process: per-token time (128 + 128, batch 1, async decoding)
and graph replay, alternating the modes twice."""
import sys
sys.path.insert(0, "scripts")
sys.path.insert(0, "dev")
from bench_engine import llama7b
from engine7b_ab import replay_ms
from quantkit.engine import runner
from quantkit.engine.config import EngineConfig
from quantkit.engine.engine import Engine
from quantkit.engine.speed import Case, measure

fused = runner.silu_mul_matmul
model = llama7b("w4a16")
for rep in range(2):
    for mode in ("fused", "unfused"):
        runner.silu_mul_matmul = fused if mode == "fused" else (lambda *a, **k: None)
        r = measure(model, list(range(100, 20000)), [Case(1, 128, 128)], EngineConfig(async_decode=True))[0]
        step, replay = replay_ms(Engine(model, EngineConfig(max_model_len=512, kv_blocks=64)))
        print(f"silu {mode:8s} TPOT {r['tpot_ms_mean']:.3f} ms  step+inputs {step:.3f}  replay {replay:.3f} ms", flush=True)
