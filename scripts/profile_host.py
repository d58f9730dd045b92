"""The engine loop's host time per decode step without a model: a stand-in step that returns at
once replaces the model's, so what is left is the Python side's bookkeeping that every token pays
(scheduling, block tables, input buffers, sampling results), synchronous and asynchronous decoding,
batch 1 and 64, on this machine's CPU. --profile adds a cProfile of each run.

    python scripts/profile_host.py [--profile]
"""
import cProfile
import pstats
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.engine.config import EngineConfig
from quantkit.engine.engine import Engine
from quantkit.engine.sequence import SamplingParams
from quantkit.models.families import LLAMA
from quantkit.models.loader import LoadedModel


class NoModel:
    def __init__(self, vocab: int):
        self.p, self.t = torch.zeros(64, 1, vocab), torch.ones(64, 1, dtype=torch.long)

    def __call__(self, x, generator=None, draw=True):
        n, s, _ = x.shape
        return self.p[:n, :s], self.t[:n, :s]


cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
loaded = LoadedModel(model=LlamaForCausalLM(cfg).eval(), tokenizer=None, family=LLAMA, source="stand-in")
for batch in (1, 64):
    for asy in (False, True):
        engine = Engine(loaded, EngineConfig(max_model_len=512, max_num_seqs=64, async_decode=asy))
        engine.target_step = NoModel(1000)
        prompts = [list(range(1, 129))] * batch
        engine.generate(prompts, SamplingParams(max_tokens=8))  # warm-up
        engine.stats = type(engine.stats)()
        seqs = [engine.add(p, SamplingParams(max_tokens=256)) for p in prompts]
        engine.step()  # the prefill
        prof = cProfile.Profile() if "--profile" in sys.argv else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        while engine.scheduler.has_work():
            engine.step()
        if prof:
            prof.disable()
        dt = time.perf_counter() - t0
        print(f"batch {batch:3d} async={int(asy)}: {dt / engine.stats.steps_decode * 1e6:7.1f} us per decode step")
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
