"""Dev aid: where the time to first token goes. A SmolLM2-135M-shaped float16 model with random
weights (30 layers, 576 / 1536, 9 / 3 heads, vocabulary 49152), batch 1, 128-token prompt: the
engine's prefill step timed piece by piece (host-synchronised) over several warm runs, with
programmatic dependent launch on and off."""
import cProfile, gc, pstats, statistics, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from quantkit.kernels import cuda
from quantkit.engine.config import EngineConfig
from quantkit.engine.engine import Engine
from quantkit.engine.sampler import probs, sample
from quantkit.engine.runner import PrefillChunk
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
sync = torch.cuda.synchronize
pauses = []
gc.callbacks.append(lambda phase, info: pauses.append((phase, info["generation"], time.perf_counter())))


def gc_ms():
    out, start = 0.0, None
    for phase, gen, t in pauses:
        if phase == "start":
            start = t
        elif start is not None:
            out += t - start
    pauses.clear()
    return round(1e3 * out, 1)


for pdl in (True, False):
    cuda.pdl_enabled = pdl
    engine = Engine(loaded, EngineConfig(max_model_len=512, kv_blocks=64))
    ttft, pre, smp, gcs = [], [], [], []
    for run in range(6):
        gc_ms()
        prof = cProfile.Profile() if run == 1 else None
        if prof:
            prof.enable()
        seqs = engine.generate([list(range(1000, 1128))], SamplingParams(max_tokens=8))
        if prof:
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
        gcs.append(gc_ms())
        ttft.append(1e3 * (seqs[0].token_times[0] - seqs[0].arrival))
        chunk = [PrefillChunk(tokens=list(range(1000, 1128)), start=0, context_slots=list(range(128)))]
        sync(); t0 = time.perf_counter()
        logits = engine.runner.prefill(chunk)
        sync(); t1 = time.perf_counter()
        sample(probs(logits, torch.zeros(1, device="cuda")), engine.generator).tolist()
        t2 = time.perf_counter()
        pre.append(1e3 * (t1 - t0)); smp.append(1e3 * (t2 - t1))
    print(f"pdl={int(pdl)} TTFT ms per run {[round(v, 1) for v in ttft]}  gc ms per run {gcs}  prefill {statistics.median(pre):.2f} ms"
          f"  sample {statistics.median(smp):.2f} ms", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.runner.prefill(chunk); sync()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12), flush=True)
