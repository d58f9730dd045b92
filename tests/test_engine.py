"""The engine end to end on the CPU: greedy equals transformers' generate, speculative greedy
equals plain greedy, preemption and prefix sharing lose nothing."""

from __future__ import annotations

import pytest
import torch

from conftest import engine_runs, w8a8_copy
from quantkit.engine.config import EngineConfig
from quantkit.engine.engine import Engine
from quantkit.engine.sequence import SamplingParams
from quantkit.eval.kv_cache import use_fp8_kv_cache
from quantkit.formats import ActSpec, FloatSpec, IntSpec, per_tensor
from quantkit.models.loader import load_model

PROMPTS = ["It is a truth universally acknowledged, that a single man",
           "The quick brown fox",
           "Elizabeth looked at her sister and said",
           "def fibonacci(n):\n    "]


def _hf_greedy(loaded, ids: list[int], n: int) -> list[int]:
    out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                eos_token_id=loaded.model.config.eos_token_id,
                                pad_token_id=loaded.model.config.eos_token_id)
    return out[0, len(ids):].tolist()


def _prompts(loaded) -> list[list[int]]:
    return [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]


def _greedy(n: int, stop: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, stop_token_ids=(stop,))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.mark.parametrize("config", [EngineConfig(block_size=16, async_decode=False),
                                    EngineConfig(block_size=4, kv_blocks=30, max_num_seqs=3, async_decode=False),  # forces preemption
                                    EngineConfig(block_size=1, max_batched_tokens=8, async_decode=False),
                                    EngineConfig(block_size=16, async_decode=True),
                                    EngineConfig(block_size=4, kv_blocks=30, max_num_seqs=3, async_decode=True)],
                         ids=["roomy", "preempting", "one-token-blocks", "async", "async-preempting"])
def test_greedy_equals_transformers_generate(tiny, config):
    prompts = _prompts(tiny) * 2
    expected = [_hf_greedy(tiny, p, 32) for p in prompts]
    engine = Engine(tiny, config)
    seqs = engine.generate(prompts, _greedy(32, tiny.model.config.eos_token_id))
    assert [s.output_ids for s in seqs] == expected
    assert engine.blocks.num_used == 0
    assert (engine.stats.pipelined > 0) == config.async_decode
    if config.kv_blocks == 30:
        assert sum(s.num_preemptions for s in seqs) > 0, "the small pool should have forced a preemption"


@pytest.mark.parametrize("mode", ["ngram", "draft"])
@pytest.mark.parametrize("k", [1, 4])
def test_speculative_greedy_equals_plain_greedy(tiny, tiny_model_dir, tmp_path, mode, k):
    from conftest import make_tiny_model

    prompts = [p + p[:5] for p in _prompts(tiny)]  # repeats give prompt lookup something to find
    params = _greedy(40, tiny.model.config.eos_token_id)
    plain = [s.output_ids for s in Engine(tiny, EngineConfig()).generate(prompts, params)]
    draft = load_model(make_tiny_model(tmp_path / "draft", seed=1)) if mode == "draft" else None
    engine = Engine(tiny, EngineConfig(speculative=mode, num_draft=k, block_size=4), draft=draft)
    seqs = engine.generate(prompts, params)
    assert [s.output_ids for s in seqs] == plain
    assert engine.stats.verify_rows > 0 and engine.stats.proposed == engine.stats.verify_rows * k
    assert engine.blocks.num_used == 0


def test_async_decode_equals_plain_decode_with_stops_and_arrivals(tiny):
    """Pipelined decode steps (each launched before the previous one's tokens are read) give the
    same tokens as plain stepping: sequences stopping on a stop token mid-pipeline, reaching
    max_tokens, arriving while a step is in flight, a pool small enough to stop the pipeline."""
    prompts = _prompts(tiny) * 2
    base = Engine(tiny, EngineConfig(block_size=4)).generate(prompts, SamplingParams(max_tokens=24))
    stop = base[0].output_ids[3]  # a token greedy decoding does produce
    params = [SamplingParams(max_tokens=m, stop_token_ids=(stop,)) for m in (5, 24, 13, 1, 24, 8, 2, 17)]
    results = []
    for async_decode in (False, True):
        engine = Engine(tiny, EngineConfig(block_size=4, kv_blocks=40, max_num_seqs=3, async_decode=async_decode))
        seqs = [engine.add(p, sp) for p, sp in zip(prompts[:4], params[:4])]
        steps = 0
        while engine.scheduler.has_work():
            engine.step()
            steps += 1
            if steps == 3:
                seqs += [engine.add(p, sp) for p, sp in zip(prompts[4:], params[4:])]
        assert engine._inflight is None and engine.blocks.num_used == 0
        assert (engine.stats.pipelined > 0) == async_decode
        results.append([s.output_ids for s in seqs])
    assert results[0] == results[1]
    assert any(o and o[-1] == stop for o in results[0]), "some sequence stopped on the stop token"
    assert all(len(o) <= sp.max_tokens and stop not in o[:-1] for o, sp in zip(results[1], params))


def test_async_sampling_is_reproducible(tiny):
    params = SamplingParams(temperature=0.8, max_tokens=20)
    runs = [[s.output_ids for s in Engine(tiny, EngineConfig(seed=5, async_decode=True)).generate(_prompts(tiny), params)]
            for _ in range(2)]
    assert runs[0] == runs[1] and all(len(o) == 20 for o in runs[0])


def test_a_model_drafting_for_itself_is_always_accepted(tiny):
    prompts = _prompts(tiny)
    engine = Engine(tiny, EngineConfig(speculative="draft", num_draft=3), draft=tiny)
    seqs = engine.generate(prompts, SamplingParams(max_tokens=24))
    plain = Engine(tiny, EngineConfig()).generate(prompts, SamplingParams(max_tokens=24))
    assert [s.output_ids for s in seqs] == [s.output_ids for s in plain]
    assert engine.stats.accepted == engine.stats.proposed > 0


def test_sampling_runs_and_is_reproducible(tiny):
    prompts = _prompts(tiny)
    params = SamplingParams(temperature=0.8, max_tokens=20)
    runs = [[s.output_ids for s in Engine(tiny, EngineConfig(speculative=m, seed=5)).generate(prompts, params)]
            for m in ("none", "none", "ngram")]
    assert runs[0] == runs[1], "same seed, same outputs"
    assert all(len(o) == 20 for r in runs for o in r)


def test_prefix_sharing_hits_and_changes_nothing(tiny):
    shared = _prompts(tiny)[0] * 3
    prompts = [shared + [5, 6], shared + [7], shared + [8, 9, 10]]
    params = _greedy(16, tiny.model.config.eos_token_id)
    expected = [_hf_greedy(tiny, p, 16) for p in prompts]
    engine = Engine(tiny, EngineConfig(block_size=4, max_num_seqs=1))  # one at a time: later ones hit the cache
    seqs = engine.generate(prompts, params)
    assert [s.output_ids for s in seqs] == expected
    assert engine.blocks.hits_tokens >= 2 * (len(shared) // 4) * 4


def test_quantized_checkpoint_runs_on_its_own_modules(tiny_model_dir, tmp_path):
    from quantkit.api import load, quantize

    quantize(str(tiny_model_dir), "w4a16-rtn", tmp_path / "w4", show_progress=False)
    loaded = load(tmp_path / "w4")
    prompts = _prompts(loaded)[:2]
    expected = [_hf_greedy(loaded, p, 16) for p in prompts]
    seqs = Engine(loaded, EngineConfig()).generate(prompts, _greedy(16, loaded.model.config.eos_token_id))
    assert [s.output_ids for s in seqs] == expected


def test_bad_requests_raise(tiny):
    engine = Engine(tiny, EngineConfig(max_model_len=64))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add(list(range(60)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="draft model"):
        Engine(tiny, EngineConfig(speculative="draft"))
    with pytest.raises(ValueError, match="speculative"):
        EngineConfig(speculative="medusa")
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add([1, tiny.model.config.vocab_size], SamplingParams(max_tokens=2))
    assert not engine.scheduler.has_work(), "a refused request leaves nothing queued"


def test_sliding_window_models_are_limited_to_their_window(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    loaded.model.config.sliding_window = 128
    with pytest.raises(ValueError, match="sliding window of 128"):
        Engine(loaded, EngineConfig(max_model_len=256))
    assert Engine(loaded, EngineConfig(max_model_len=128)).generate([[1, 2]], SamplingParams(max_tokens=3))[0].num_output == 3


def test_real_model_greedy_equals_transformers_generate():
    loaded = load_model(None)  # the bundled SmolLM2-135M-Instruct, float32 on the CPU
    prompts = _prompts(loaded)[:3]
    expected = [_hf_greedy(loaded, p, 32) for p in prompts]
    seqs = Engine(loaded, EngineConfig()).generate(prompts, _greedy(32, loaded.model.config.eos_token_id))
    assert [s.output_ids for s in seqs] == expected


def test_an_fp8_kv_cache_is_attention_over_fp8_rounded_keys_and_values(tiny):
    """kv_cache_dtype="fp8": greedy equals transformers' generate with an attention that rounds its
    keys (after RoPE) and values to FP8 E4M3 first (saturating), which is all the FP8 cache changes."""
    prompts = _prompts(tiny)
    stop = tiny.model.config.eos_token_id
    engine = Engine(tiny, EngineConfig(block_size=4, kv_cache_dtype="fp8"))
    assert all(k.dtype == v.dtype == torch.float8_e4m3fn for k, v in engine.runner.cache)
    seqs = engine.generate(prompts, _greedy(32, stop))
    attn = use_fp8_kv_cache(tiny.model)
    try:
        expected = [_hf_greedy(tiny, p, 32) for p in prompts]
    finally:
        tiny.model.set_attn_implementation(attn)
    assert [s.output_ids for s in seqs] == expected
    # the tiny model's greedy tokens hardly move: its logits show the rounding is the one transformers did
    from quantkit.engine.runner import PrefillChunk

    ids = prompts[0]
    ours = Engine(tiny, EngineConfig(kv_cache_dtype="fp8")).runner.prefill([PrefillChunk(ids, 0, list(range(len(ids))))])[0]
    with torch.inference_mode():
        plain = tiny.model(torch.tensor([ids])).logits[0, -1]
        use_fp8_kv_cache(tiny.model)
        try:
            rounded = tiny.model(torch.tensor([ids])).logits[0, -1]
        finally:
            tiny.model.set_attn_implementation(attn)
    assert torch.allclose(ours, rounded, atol=1e-5, rtol=0)
    assert (plain - rounded).abs().max() > 1e-3


def test_fp8_kv_rounding_works_under_eager_and_sdpa_attention(tiny_model_dir):
    # use_fp8_kv_cache wraps whichever attention the model has; eager and SDPA round the same keys
    # and values, so they agree with each other and both differ from the unrounded model
    ids = torch.tensor([_prompts(load_model(tiny_model_dir))[0]])
    logits = {}
    for impl in ("eager", "sdpa"):
        loaded = load_model(tiny_model_dir)
        loaded.model.set_attn_implementation(impl)
        with torch.inference_mode():
            plain = loaded.model(ids).logits[0]
            assert use_fp8_kv_cache(loaded.model) == impl
            assert use_fp8_kv_cache(loaded.model) == impl  # twice: still one rounding
            logits[impl] = loaded.model(ids).logits[0]
        assert (plain - logits[impl]).abs().max() > 1e-3
    assert torch.allclose(logits["eager"], logits["sdpa"], atol=1e-5, rtol=0)


def test_perplexity_with_an_fp8_kv_cache(tiny_model_dir):
    from quantkit import api

    common = dict(data=("austen-eval",), seqlen=32, windows=3, batch_size=2, show_progress=False)
    auto, fp8 = (api.evaluate(str(tiny_model_dir), kv_cache_dtype=d, **common)[0] for d in ("auto", "fp8"))
    assert (auto["kv_cache_dtype"], fp8["kv_cache_dtype"]) == ("auto", "fp8")
    assert fp8["perplexity"] != auto["perplexity"] and abs(fp8["perplexity"] / auto["perplexity"] - 1) < 0.05
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        api.evaluate(str(tiny_model_dir), kv_cache_dtype="int4", **common)


def test_kv_cache_dtype_is_checked_and_sizes_the_pool():
    from quantkit.engine.runner import Shape

    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int4")
    shape = Shape(layers=2, heads=4, kv_heads=2, head_dim=8)
    assert shape.kv_bytes_per_slot(torch.float8_e4m3fn) * 2 == shape.kv_bytes_per_slot(torch.float16)
    assert EngineConfig(kv_cache_dtype="fp8").kv_dtype(torch.bfloat16) == torch.float8_e4m3fn
    assert EngineConfig().kv_dtype(torch.bfloat16) == torch.bfloat16


def test_speed_keeps_fp8_weights_fp8_in_half_precision(tiny_model_dir, tmp_path):
    """api.speed casts the model to the activations' dtype without touching FP8 weights."""
    from quantkit import api

    api.quantize(str(tiny_model_dir), "w8a8-fp8-dynamic", tmp_path / "fp8", num_samples=4, seqlen=64, show_progress=False)
    rows = api.speed(tmp_path / "fp8", batch_sizes=(2,), prompt_len=8, output_len=4, device="cpu", dtype="bfloat16")
    assert rows[0]["output_tokens"] == 8 and rows[0]["dtype"] == "bfloat16"


@pytest.mark.parametrize("spec,act", [(FloatSpec("channel"), ActSpec("fp8")), (FloatSpec("tensor"), ActSpec("fp8")),
                                      (IntSpec(8, True, None), ActSpec("int8"))],
                         ids=["fp8-channel", "fp8-tensor", "int8-channel"])
def test_w8a8_inputs_quantized_by_the_op_in_front_change_nothing(tiny_model_dir, monkeypatch, spec, act):
    """W8A8 linears with per-token inputs: the norms (fused q/k/v and gate/up) and SiLU * up (down_proj)
    write their inputs quantized, and the outputs and logits are bit for bit those of each linear
    quantizing its own input. Per-tensor weights do not fuse: only down_proj's input is written so."""
    from quantkit.engine import runner
    from quantkit.kernels import engine_ops as ops

    loaded = w8a8_copy(load_model(tiny_model_dir), spec, act)
    prompts = _prompts(loaded)
    params, config = _greedy(24, loaded.model.config.eos_token_id), EngineConfig(block_size=4)
    calls = []
    for name in ("add_rms_norm_quant", "silu_mul_quant"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, _op=op: calls.append(_op.__name__) or _op(*args))
    fused = engine_runs(loaded, prompts, params, config)
    assert "silu_mul_quant" in calls and ("add_rms_norm_quant" in calls) == (not per_tensor(spec))
    monkeypatch.setattr(runner, "_quantized_input", lambda module: None)  # each linear quantizes its input
    plain = engine_runs(loaded, prompts, params, config)
    assert fused[0] == plain[0] and all(len(o) > 0 for o in fused[0])
    assert torch.equal(fused[1], plain[1])
