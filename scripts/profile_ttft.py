"""Where the time to first token goes, and why the engine's prefill attention leaves out cuDNN
(quantkit.engine.runner): a SmolLM2-135M-shaped float16 model with random weights (30 layers,
576 / 1536, 9 / 3 heads, vocabulary 49152) on a GPU, batch 1, the TTFT of successive requests whose
prompt lengths repeat and change, with the engine's attention backends, with cuDNN's SDPA allowed
too, and with the engine's again; and a cProfile of the slowest request of each run. cuDNN builds a
plan for every prompt length it has not seen (BENCHMARKS.md, "The engine").

    python scripts/profile_ttft.py
"""
import cProfile
import io
import pstats

import torch
from torch.nn.attention import SDPBackend
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.engine import runner
from quantkit.engine.config import EngineConfig
from quantkit.engine.engine import Engine
from quantkit.engine.sequence import SamplingParams
from quantkit.models.families import LLAMA
from quantkit.models.loader import LoadedModel

config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
torch.manual_seed(0)
torch.set_default_dtype(torch.float16)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
torch.set_default_dtype(torch.float32)
loaded = LoadedModel(model=model, tokenizer=None, family=LLAMA, source="smollm2-shape-random")
LENGTHS = [128, 128, 128, 96, 96, 200, 128, 77, 300]
ours = runner._PREFILL_ATTENTION
for mode in ("no cuDNN", "cuDNN allowed", "no cuDNN"):
    runner._PREFILL_ATTENTION = ours if mode == "no cuDNN" else [SDPBackend.CUDNN_ATTENTION] + ours
    engine = Engine(loaded, EngineConfig(max_model_len=512, kv_blocks=64))
    ttft, worst = [], (0.0, "")
    for n in LENGTHS:
        prof = cProfile.Profile()
        prof.enable()
        seq = engine.generate([list(range(1000, 1000 + n))], SamplingParams(max_tokens=4))[0]
        prof.disable()
        t = 1e3 * (seq.token_times[0] - seq.arrival)
        ttft.append(round(t, 1))
        if t > worst[0]:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(4)
            worst = (t, s.getvalue())
    print(f"{mode:14s} prompt lengths {LENGTHS}\n{'':14s} TTFT ms        {ttft}", flush=True)
    print(worst[1][-900:])
