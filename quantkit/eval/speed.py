"""`quantkit eval --speed`: latency and throughput of a model through quantkit.engine.

For each (batch, prompt length, output length) case, `batch` prompts cut from real text at
different offsets run to exactly `output` new tokens (stop tokens ignored). Reported: time to
first token, inter-token latency p50 / p99 (per sequence, consecutive tokens; tokens that one
speculative step emits together count as zero), time per output token, output tokens/s, and
with speculative decoding the acceptance rate and tokens emitted per verification, plus the
KV blocks in use against allocated at steady state. Each case runs twice; the second run is
the one reported (the first pays for CUDA graph capture and kernel compilation). A mixture of
experts' row names the path its sparse layers ran (`moe`: quantkit.engine.moe.PATH, no fused
kernel), None for a dense model.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch

from quantkit.engine.config import EngineConfig
from quantkit.engine.engine import Engine
from quantkit.engine.sequence import SamplingParams, Sequence
from quantkit.models.loader import LoadedModel


@dataclass(frozen=True)
class Case:
    batch: int
    prompt: int
    output: int

    def __post_init__(self) -> None:
        if min(self.batch, self.prompt, self.output) < 1:
            raise ValueError(f"batch, prompt and output lengths must be at least 1, got {self}")


def prompts_from_text(tokens: list[int], batch: int, length: int) -> list[list[int]]:
    """`batch` prompts of `length` tokens from different parts of a token stream."""
    if len(tokens) < length + batch:
        raise ValueError(f"the text has {len(tokens)} tokens, too few for {batch} prompts of {length}")
    stride = max(1, (len(tokens) - length) // batch)
    return [tokens[i * stride:i * stride + length] for i in range(batch)]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(engine: Engine, prompts: list[list[int]], output: int) -> dict:
    params = SamplingParams(max_tokens=output)
    _sync(engine.device)
    t0 = time.perf_counter()
    seqs: list[Sequence] = engine.generate(prompts, params)
    _sync(engine.device)
    wall = time.perf_counter() - t0
    ttft = [s.token_times[0] - s.arrival for s in seqs]
    itl = [b - a for s in seqs for a, b in zip(s.token_times, s.token_times[1:])]
    tpot = [(s.token_times[-1] - s.token_times[0]) / (len(s.token_times) - 1) for s in seqs if len(s.token_times) > 1]
    st = engine.stats
    steady = [(a - u) / a for u, a in zip(st.kv_used, st.kv_allocated) if a]
    out_tokens = sum(s.num_output for s in seqs)
    return {
        "seconds": wall,
        "output_tokens": out_tokens,
        "tokens_per_s": out_tokens / wall,
        "decode_tokens_per_s": sum(s.num_output - 1 for s in seqs) / max(1e-9, max(s.token_times[-1] for s in seqs)
                                                                          - min(s.token_times[0] for s in seqs)),
        "ttft_ms_p50": 1e3 * statistics.median(ttft),
        "itl_ms_p50": 1e3 * _percentile(itl, 0.5),
        "itl_ms_p99": 1e3 * _percentile(itl, 0.99),
        "tpot_ms_mean": 1e3 * statistics.fmean(tpot) if tpot else float("nan"),
        "acceptance_rate": st.accepted / st.proposed if st.proposed else None,
        "tokens_per_verify": st.emitted / st.verify_rows if st.verify_rows else None,
        "kv_unused_fraction": statistics.fmean(steady) if steady else None,
        "kv_blocks_allocated_peak": max(st.kv_allocated, default=0) // engine.config.block_size,
        "kv_blocks_total": engine.blocks.num_blocks,
        "preemptions": sum(s.num_preemptions for s in seqs),
        "pipelined_steps": st.pipelined,
    }


def measure(target: LoadedModel, text_tokens: list[int], cases: list[Case], config: EngineConfig,
            draft: LoadedModel | None = None, progress=None) -> list[dict]:
    """One row per case (see the module docstring); `progress(case)` is called before each."""
    rows = []
    for case in cases:
        if progress is not None:
            progress(case)
        prompts = prompts_from_text(text_tokens, case.batch, case.prompt)
        per_seq = -(-(case.prompt + case.output + config.lookahead + 2) // config.block_size)
        cfg = dataclasses.replace(config, max_model_len=max(config.max_model_len, case.prompt + case.output + 1),
                                  max_num_seqs=max(config.max_num_seqs, case.batch),
                                  # a pool that holds the whole batch (sized from free memory it would take most of the GPU)
                                  kv_blocks=config.kv_blocks or case.batch * per_seq + 8)
        engine = Engine(target, cfg, draft=draft)
        run_case(engine, prompts, case.output)  # warm-up: graphs, compilation
        engine.stats = type(engine.stats)()
        row = run_case(engine, prompts, case.output)
        rows.append({"batch": case.batch, "prompt": case.prompt, "output": case.output,
                     "speculative": cfg.speculative, "num_draft": cfg.num_draft if cfg.speculative != "none" else 0,
                     "async_decode": cfg.async_decode, "moe": engine.runner.moe_path, **row})
        del engine
        if target.model.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def hf_generate_tokens_per_s(target: LoadedModel, prompt: list[int], output: int, repeats: int = 2) -> float:
    """transformers' greedy generate at batch 1 (the baseline), new tokens per second of the best run."""
    device = target.model.device
    ids = torch.tensor([prompt], device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        _sync(device)
        t0 = time.perf_counter()
        target.model.generate(ids, max_new_tokens=output, min_new_tokens=output, do_sample=False,
                              pad_token_id=target.model.config.eos_token_id)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return output / best
