"""The engine's numbers for issue 7 on a GPU, one table per part (JSON with --json-out).

    python scripts/bench_engine.py --model SmolLM2.gguf [--parts smol llama7b spec]

smol      SmolLM2 in float16: batch-1 decode tokens/s through the engine (CUDA graphs) against
          transformers' generate on the same prompt, and the engine at batch 8 and 64.
llama7b   a Llama-2-7B-shaped model with random weights (32 layers, 4096 / 11008, 32 heads,
          vocabulary 32000): decode time per token at batch 1, float16 against W4A16 g128 (RTN),
          both through the engine; and the step times the speculative projection needs.
spec      speculative decoding on SmolLM2 with Austen prompts: prompt lookup and a W4A16 copy of
          the model drafting for the float16 one; acceptance, tokens per verification, batch-1
          speedup, greedy outputs against plain greedy; and the projection for the 7B shape from
          the measured acceptance and the measured 7B-shaped step times (labelled as such).
batch     (not run by default) the Llama-2-7B shape in float16, W4A16 g128 and W8A8 FP8 (per-channel
          weights, per-token dynamic inputs written quantized by the norm / SiLU kernels): decode
          tokens/s at batch 1 .. 256 (--batches), 128 + 128 tokens, against float16 in the same
          process; beside it, computed, the bytes a decode step reads: weights against KV cache.
          --batch-models picks the rows; "+kv8" runs one with an FP8 KV cache (w8a8-fp8+kv8).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from quantkit.calibration import DEFAULT_EVALUATION, evaluation_tokens
from quantkit.engine.config import EngineConfig
from quantkit.engine.engine import Engine
from quantkit.engine.sequence import SamplingParams
from quantkit.eval.speed import Case, hf_generate_tokens_per_s, measure, prompts_from_text
from quantkit.engine.runner import Shape
from quantkit.formats import ActSpec, FloatSpec, IntSpec, pack_int32
from quantkit.formats.qparams import quantize_rtn
from quantkit.models.families import LLAMA
from quantkit.models.loader import LoadedModel, load_model
from quantkit.nn.quant_linear import IntWeightLinear, W8A8Linear

console = Console()


def smol(model: LoadedModel, tokens: list[int], out: dict) -> None:
    prompt = prompts_from_text(tokens, 1, 128)[0]
    hf = hf_generate_tokens_per_s(model, prompt, 128)
    rows = measure(model, tokens, [Case(b, 128, 128) for b in (1, 8, 64)], EngineConfig())
    out["smol"] = {"hf_generate_tokens_per_s": hf, "engine": rows}
    t = Table(title=f"SmolLM2-135M float16, 128 + 128 tokens, {torch.cuda.get_device_name()}")
    for c in ("what", "batch", "tokens/s", "vs HF generate", "TPOT ms", "ITL p99 ms", "TTFT ms", "KV unused"):
        t.add_column(c, justify="left" if c == "what" else "right")
    t.add_row("transformers generate", "1", f"{hf:.1f}", "1.00x", f"{1e3 / hf:.2f}", "", "", "")
    for r in rows:
        t.add_row("quantkit engine", str(r["batch"]), f"{r['tokens_per_s']:.1f}",
                  f"{r['decode_tokens_per_s'] / hf:.2f}x" if r["batch"] == 1 else "", f"{r['tpot_ms_mean']:.2f}",
                  f"{r['itl_ms_p99']:.2f}", f"{r['ttft_ms_p50']:.1f}", f"{100 * r['kv_unused_fraction']:.2f}%")
    console.print(t)


def llama7b(which: str) -> LoadedModel:
    """Random Llama-2-7B-shaped weights on the GPU, float16, W4A16 g128 or W8A8 FP8 ("w8a8-fp8"; both
    RTN of the same draw)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    loaded = LoadedModel(model=model, tokenizer=None, family=LLAMA, source=f"llama-2-7b-shape-random-{which}")
    if which in QUANTIZED_COPIES:
        QUANTIZED_COPIES[which](loaded)
        torch.cuda.empty_cache()
    return loaded


def step_times(model: LoadedModel, ks: tuple[int, ...]) -> dict:
    """Median ms of one graphed decode step at batch 1 with S = 1 + k tokens (S = 1: plain decode),
    context 256."""
    engine = Engine(model, EngineConfig(max_model_len=512, kv_blocks=64))
    seq = engine.add(list(range(1, 257)), SamplingParams(max_tokens=64))
    engine.step()  # prefill, allocates 256 + 1 positions
    times = {}
    for k in ks:
        engine.blocks.append_slots(seq, k + 1)
        x = engine._inputs([seq], [len(seq) - 1], k + 1, [[1] * (k + 1)])
        for _ in range(3):
            engine.target_step(x, draw=False)
        ts = []
        for _ in range(20):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.target_step(x, draw=False)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        times[k] = 1e3 * sorted(ts)[len(ts) // 2]
    return times


def llama_part(out: dict) -> None:
    res = {}
    for which in ("float16", "w4a16"):
        model = llama7b(which)
        rows = measure(model, list(range(100, 20000)), [Case(1, 128, 128)], EngineConfig())
        res[which] = {"engine": rows[0], "step_ms": step_times(model, (0, 2, 4))}
        del model
        torch.cuda.empty_cache()
    f16, w4 = res["float16"]["engine"]["tpot_ms_mean"], res["w4a16"]["engine"]["tpot_ms_mean"]
    res["w4a16_speedup_per_token"] = f16 / w4
    out["llama7b"] = res
    t = Table(title=f"Llama-2-7B shape, random weights, batch 1, 128 + 128 tokens, {torch.cuda.get_device_name()}")
    for c in ("weights", "ms per token", "tokens/s", "speedup", "step ms (S=1 / 3 / 5)"):
        t.add_column(c, justify="left" if c == "weights" else "right")
    for which in ("float16", "w4a16"):
        r, st = res[which]["engine"], res[which]["step_ms"]
        t.add_row(which, f"{r['tpot_ms_mean']:.2f}", f"{r['decode_tokens_per_s']:.1f}", f"{f16 / r['tpot_ms_mean']:.2f}x",
                  " / ".join(f"{st[k]:.2f}" for k in (0, 2, 4)))
    console.print(t)


def spec_part(model: LoadedModel, draft: LoadedModel, tokens: list[int], out: dict) -> None:
    prompts = prompts_from_text(tokens, 8, 128)
    params = SamplingParams(max_tokens=128)
    plain = Engine(model, EngineConfig()).generate(prompts, params)
    res = {"rows": []}
    base = measure(model, tokens, [Case(1, 128, 128)], EngineConfig())[0]
    for mode, k in (("ngram", 2), ("ngram", 4), ("draft", 2), ("draft", 4)):
        cfg = EngineConfig(speculative=mode, num_draft=k)
        engine = Engine(model, cfg, draft=draft if mode == "draft" else None)
        outs = engine.generate(prompts, params)
        same = sum(a.output_ids == b.output_ids for a, b in zip(outs, plain))
        first_diff = [next((i for i, (x, y) in enumerate(zip(a.output_ids, b.output_ids)) if x != y), None)
                      for a, b in zip(outs, plain)]
        st = engine.stats
        row = measure(model, tokens, [Case(1, 128, 128)], cfg, draft=draft if mode == "draft" else None)[0]
        res["rows"].append({"mode": mode, "k": k, "acceptance_rate_b8": st.accepted / st.proposed,
                            "tokens_per_verify_b8": st.emitted / st.verify_rows, "greedy_identical": f"{same}/{len(prompts)}",
                            "first_divergence": first_diff, "batch1": row,
                            "speedup_b1": base["tpot_ms_mean"] / row["tpot_ms_mean"]})
    out["spec"] = res
    t = Table(title=f"speculative decoding, SmolLM2 float16 target, Austen prompts (128 + 128), {torch.cuda.get_device_name()}")
    for c in ("draft", "k", "accepted", "tokens/verify", "greedy = plain", "batch-1 ms/token", "speedup"):
        t.add_column(c, justify="left" if c == "draft" else "right")
    t.add_row("none", "0", "", "", "", f"{base['tpot_ms_mean']:.2f}", "1.00x")
    for r in res["rows"]:
        t.add_row("prompt lookup" if r["mode"] == "ngram" else "W4A16 SmolLM2", str(r["k"]), f"{100 * r['acceptance_rate_b8']:.1f}%",
                  f"{r['tokens_per_verify_b8']:.2f}", r["greedy_identical"], f"{r['batch1']['tpot_ms_mean']:.2f}",
                  f"{r['speedup_b1']:.2f}x")
    console.print(t)
    if "llama7b" in out:  # projection: 7B fp16 target verifying k drafts of its W4A16 copy
        st16, st4 = out["llama7b"]["float16"]["step_ms"], out["llama7b"]["w4a16"]["step_ms"]
        proj = []
        for r in res["rows"]:
            if r["mode"] != "draft":
                continue
            k, e = r["k"], r["tokens_per_verify_b8"]
            t_step = k * st4[0] + st16[k]  # k draft steps + one verification of 1 + k tokens
            proj.append({"k": k, "tokens_per_verify": e, "ms_per_token": t_step / e, "speedup": e * st16[0] / t_step})
        out["spec"]["projection_7b"] = proj
        for p in proj:
            console.print(f"PROJECTION (not measured end to end): 7B fp16 target + its W4A16 copy as draft, k={p['k']}: "
                          f"{p['tokens_per_verify']:.2f} tokens per verification (SmolLM2's, measured) x 7B step times "
                          f"(measured) -> {p['ms_per_token']:.2f} ms/token, {p['speedup']:.2f}x over plain fp16 decode")


def _replace_block_linears(loaded: LoadedModel, quantized) -> LoadedModel:
    """Every block linear of `loaded` replaced by quantized(linear)."""
    for block in loaded.model.model.layers:
        for name in LLAMA.linears:
            parent, attr = name.rsplit(".", 1)
            owner = block.get_submodule(parent)
            setattr(owner, attr, quantized(getattr(owner, attr)))
    return loaded


def w4a16_copy(loaded: LoadedModel) -> LoadedModel:
    """The model with every block linear replaced by its W4A16 g128 RTN quantization (the draft)."""
    spec = IntSpec(4, True, 128)

    def quantized(lin: torch.nn.Linear) -> IntWeightLinear:
        qw = quantize_rtn(lin.weight.float(), spec)
        q = IntWeightLinear(lin.in_features, lin.out_features, spec, dtype=lin.weight.dtype, device=lin.weight.device)
        q.weight_packed.copy_(pack_int32(qw.q, 4, 1))
        q.weight_scale.copy_(qw.scale)
        return q
    return _replace_block_linears(loaded, quantized)


def w8a8_fp8_copy(loaded: LoadedModel) -> LoadedModel:
    """The model with every block linear replaced by its W8A8 FP8 RTN quantization: E4M3 weights with
    one scale per output channel (s = amax / 448 of the row), inputs quantized per token at run time."""
    spec, act = FloatSpec("channel"), ActSpec("fp8", dynamic=True)

    def quantized(lin: torch.nn.Linear) -> W8A8Linear:
        qw = quantize_rtn(lin.weight, spec)  # the scale in the weight's dtype, q from the stored scale
        q = W8A8Linear(lin.in_features, lin.out_features, spec, act, dtype=lin.weight.dtype, device=lin.weight.device)
        q.weight.copy_(qw.q)
        q.weight_scale.copy_(qw.scale)
        return q
    return _replace_block_linears(loaded, quantized)


QUANTIZED_COPIES = {"w4a16": w4a16_copy, "w8a8-fp8": w8a8_fp8_copy}
BATCHES = (1, 8, 16, 32, 64, 128, 256)
# the batch part's rows: a weight format, "+kv8" for an FP8 KV cache (EngineConfig.kv_cache_dtype)
BATCH_MODELS = ("float16", "w4a16", "w8a8-fp8")
KV8 = "+kv8"
BATCH_CHOICES = BATCH_MODELS + tuple(m + KV8 for m in BATCH_MODELS)


def step_bytes(model: LoadedModel, batch: int, positions: int, kv_dtype: torch.dtype) -> dict:
    """Computed, not measured: the bytes one decode step reads at `batch` sequences of `positions`
    cached positions each: every block's weights and the LM head once (the embedding gathers rows
    only), and each sequence's K and V of every layer, in kv_dtype."""
    m = model.model
    weights = sum(t.numel() * t.element_size() for t in [*m.model.layers.parameters(), *m.model.layers.buffers()])
    weights += m.lm_head.weight.numel() * m.lm_head.weight.element_size()
    kv = batch * positions * Shape.of(m.config).kv_bytes_per_slot(kv_dtype)
    return {"weight_bytes": weights, "kv_bytes": kv}


def batch_part(out: dict, batches: tuple[int, ...], which_models: tuple[str, ...] = BATCH_MODELS) -> None:
    prompt, output = 128, 128
    res: dict = {"prompt": prompt, "output": output, "batches": list(batches), "models": {}}
    for which in dict.fromkeys(("float16",) + tuple(which_models)):  # float16 is every ratio's baseline
        weights, kv8 = which.removesuffix(KV8), which.endswith(KV8)
        # one prefill step for the whole batch, so that the decode window holds decode steps only; measure
        # sizes each case's KV pool and max_num_seqs for its batch (256 x 258 positions: 36 GB at batch 256)
        config = EngineConfig(max_batched_tokens=max(batches) * prompt, kv_cache_dtype="fp8" if kv8 else "auto")
        model = llama7b(weights)
        rows = measure(model, list(range(100, 20000)), [Case(b, prompt, output) for b in batches], config)
        kv_dtype = config.kv_dtype(torch.float16)
        res["models"][which] = {"engine": rows, "bytes": [step_bytes(model, b, prompt + output, kv_dtype) for b in batches]}
        del model, rows
        gc.collect()
        torch.cuda.empty_cache()
    f16 = [r["decode_tokens_per_s"] for r in res["models"]["float16"]["engine"]]
    for which, m in res["models"].items():
        m["vs_float16"] = [r["decode_tokens_per_s"] / b for r, b in zip(m["engine"], f16)]
    out["batch"] = res
    _batch_table(res)


def _batch_table(res: dict) -> None:
    models = res["models"]
    t = Table(title=f"Llama-2-7B shape, random weights, decode tokens/s, {res['prompt']} + {res['output']} tokens, "
                    f"{torch.cuda.get_device_name()}; +kv8: an FP8 KV cache",
              caption="* COMPUTED, not measured: the bytes one decode step reads, weights (once a step) + K and V of "
                      f"{res['prompt'] + res['output']} positions per sequence (the last step's), and the cap on the "
                      "ratio to float16 if a step were only those reads: float16's bytes over the row's")
    t.add_column("batch", justify="right")
    for which in models:
        t.add_column(which, justify="right")
        if which != "float16":
            t.add_column("vs fp16", justify="right")
            t.add_column("cap*", justify="right")
    t.add_column("KV GB fp16*", justify="right")
    for i, b in enumerate(res["batches"]):
        base = models["float16"]["bytes"][i]
        cells = [str(b)]
        for which, m in models.items():
            cells.append(f"{m['engine'][i]['decode_tokens_per_s']:.0f}")
            if which != "float16":
                mine = m["bytes"][i]
                cap = (base["weight_bytes"] + base["kv_bytes"]) / (mine["weight_bytes"] + mine["kv_bytes"])
                cells += [f"{m['vs_float16'][i]:.2f}x", f"{cap:.2f}x"]
        cells.append(f"{base['kv_bytes'] / 1e9:.2f}")
        t.add_row(*cells)
    console.print(t)


def identity(model: LoadedModel, draft: LoadedModel, tokens: list[int], out: dict) -> None:
    prompts = prompts_from_text(tokens, 8, 128)
    params = SamplingParams(max_tokens=128)
    plain = Engine(model, EngineConfig()).generate(prompts, params)
    rows = []
    for mode, k in (("ngram", 4), ("draft", 4)):
        outs = Engine(model, EngineConfig(speculative=mode, num_draft=k), draft=draft if mode == "draft" else None
                      ).generate(prompts, params)
        same = sum(a.output_ids == b.output_ids for a, b in zip(outs, plain))
        rows.append({"mode": mode, "k": k, "greedy_identical": f"{same}/{len(prompts)}"})
        console.print(f"float32 greedy, speculative {mode} k={k}: {same}/{len(prompts)} of 128-token outputs identical "
                      f"to plain greedy")
    out["spec_float32_identity"] = rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="SmolLM2 (default: the bundled GGUF)")
    p.add_argument("--parts", nargs="+", default=["smol", "llama7b", "spec"],
                   choices=["smol", "llama7b", "spec", "batch"])
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), help="the batch part's batch sizes")
    p.add_argument("--batch-models", nargs="+", default=list(BATCH_MODELS), choices=BATCH_CHOICES,
                   help="the batch part's rows (float16 always runs: the baseline); +kv8: with an FP8 KV cache")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    out: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    model = draft = tokens = None
    if {"smol", "spec"} & set(args.parts):
        model = load_model(args.model)
        model.model.to("cuda", torch.float16)
        tokens = evaluation_tokens(model.tokenizer, DEFAULT_EVALUATION).tolist()
    if "smol" in args.parts:
        smol(model, tokens, out)
    if "llama7b" in args.parts:
        llama_part(out)
    if "batch" in args.parts:
        batch_part(out, tuple(args.batches), tuple(args.batch_models))
    if "spec" in args.parts:
        draft = w4a16_copy(load_model(args.model))
        draft.model.to("cuda", torch.float16)
        spec_part(model, draft, tokens, out)
        # the same check in float32, where batched and one-token forwards round alike far more often
        model32, draft32 = load_model(args.model), w4a16_copy(load_model(args.model))
        model32.model.to("cuda")
        draft32.model.to("cuda")
        identity(model32, draft32, tokens, out)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
