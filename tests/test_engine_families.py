"""The engine on the families beyond Llama (issue 20), on the CPU in float32 through the torch twins:
greedy output equals transformers' generate for 32 tokens, the step's distributions equal
transformers' forward, a W4A16 checkpoint runs on its own modules, sliding-window layers attend only
inside their window, and a model whose every layer slides frees the KV blocks no layer can read.

The tiny random models (transformers' own config classes, GQA) are built so that every feature
shows: weights drawn at 5x the default scale (the attention scores reach a few units, so that
soft-capping at 2 bends them), norm weights away from the family's identity, sliding windows of 8
tokens under prompts and outputs of up to 60, Gemma's query scale off head_dim.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from conftest import random_model, verification_distributions
from quantkit.engine.config import EngineConfig
from quantkit.engine.engine import Engine
from quantkit.engine.layers import model_facts
from quantkit.engine.sequence import SamplingParams
from quantkit.models.loader import load_model

WINDOW = 8
_GEMMA = dict(head_dim=24, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=16,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"])
MODELS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_GEMMA, attn_logit_softcapping=2.0,
                                                         final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        _GEMMA, final_logit_softcapping=3.0,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    # Phi-3 with half of each head rotated (Phi-4-mini's partial_rotary_factor)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False, partial_rotary_factor=0.5)),
    # Phi-3's own sliding_window (as Mistral's): every layer slides, so old KV blocks are freed
    "phi3-sliding": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False, sliding_window=WINDOW)),
    # Phi-3 128k's longrope, run inside its original context (the short factors)
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM", dict(
        tie_word_embeddings=False, original_max_position_embeddings=64,
        rope_scaling={"type": "longrope", "short_factor": [1.5] * 12, "long_factor": [4.0] * 12})),
}


@functools.cache
def _tokenizer():
    from conftest import _tiny_tokenizer

    return _tiny_tokenizer()


def make_model(folder: Path, name: str, seed: int = 0, **overrides) -> Path:
    config_class, model_class, extra = MODELS[name]
    tokenizer = _tokenizer()
    fields = dict(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = random_model(config_class, model_class, {**fields, **extra, **overrides}, seed, norm_noise=0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_model(tmp_path_factory.mktemp(name), name)
        return made[name]
    return get


@pytest.fixture(scope="module")
def expected():
    """name -> transformers' greedy 32 tokens after each of _prompts (computed once per model)."""
    done: dict[str, list[list[int]]] = {}

    def get(name: str, model) -> list[list[int]]:
        if name not in done:
            done[name] = [_hf_greedy(model, p, 32) for p in _prompts(model.config.vocab_size)]
        return done[name]
    return get


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (5, 13, 21, 3, 30)]


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=model.config.pad_token_id)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("config", [EngineConfig(block_size=4, max_model_len=64, async_decode=False),
                                    EngineConfig(block_size=4, max_model_len=64, kv_blocks=24, max_num_seqs=3),
                                    EngineConfig(block_size=1, max_model_len=64, max_batched_tokens=16)],
                         ids=["roomy", "small-pool-async", "one-token-blocks"])
def test_greedy_equals_transformers_generate(model_dir, expected, name, config):
    loaded = load_model(model_dir(name))
    prompts = _prompts(loaded.model.config.vocab_size)
    engine = Engine(loaded, config)
    seqs = engine.generate(prompts, SamplingParams(max_tokens=32))
    assert [s.output_ids for s in seqs] == expected(name, loaded.model)
    assert engine.blocks.num_used == 0
    if config.kv_blocks == 24 and engine.scheduler.kv_window is None:
        assert sum(s.num_preemptions for s in seqs) > 0, "the small pool should have forced a preemption"


@pytest.mark.parametrize("name", list(MODELS))
def test_step_distributions_equal_transformers_forward(model_dir, name):
    """Prefill then one decode step of 3 tokens (the verification shape): the distributions at
    temperature 1 are transformers' softmax of its logits, final soft-capping included (which no
    greedy token can show: tanh keeps the order)."""
    loaded = load_model(model_dir(name))
    prompt = _prompts(loaded.model.config.vocab_size)[4]  # 30 tokens: past the window
    p, reference = verification_distributions(loaded, EngineConfig(block_size=4, max_model_len=64), prompt)
    torch.testing.assert_close(p, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_fp8_kv_cache_distributions_equal_transformers_over_fp8_rounded_keys_and_values(model_dir, name):
    """The engine with an FP8 cache against transformers with use_fp8_kv_cache (what `quantkit eval
    --kv-cache-dtype fp8` measures): the same distributions past the sliding window, with soft-capping,
    partial rotary and every family's own eager attention in one process."""
    from quantkit.eval.kv_cache import use_fp8_kv_cache

    loaded = load_model(model_dir(name))
    prompt = _prompts(loaded.model.config.vocab_size)[4]  # 30 tokens: past the window
    plain, _ = verification_distributions(loaded, EngineConfig(block_size=4, max_model_len=64), prompt)
    use_fp8_kv_cache(loaded.model)
    p, reference = verification_distributions(loaded, EngineConfig(block_size=4, max_model_len=64,
                                                                   kv_cache_dtype="fp8"), prompt)
    torch.testing.assert_close(p, reference, rtol=1e-5, atol=1e-6)
    assert (p - plain).abs().max() > 1e-4  # the rounding shows


def test_the_features_are_on():
    """The models above exercise what they are meant to (a guard against a config that silently
    drops a field): windows where the family has them, the capping, Gemma 3's two rotary bases."""
    import transformers

    from quantkit.models.families import family_for

    def facts(name):
        config_class, model_class, extra = MODELS[name]
        fields = dict(vocab_size=64, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=0, bos_token_id=None)
        config = getattr(transformers, config_class)(**{**fields, **extra})
        return model_facts(getattr(transformers, model_class)(config), family_for(config))

    g2, g3, sliding = facts("gemma2"), facts("gemma3"), facts("phi3-sliding")
    assert g2.windows == (WINDOW, None, WINDOW) and g2.softcaps == (2.0,) * 3 and g2.final_softcap == 3.0
    assert g2.offset == 1.0 and g2.activation == "gelu_pytorch_tanh" and g2.scales == (16 ** -0.5,) * 3
    assert g3.rotary_keys == ("sliding_attention", "full_attention", "sliding_attention") and g3.kv_window is None
    assert sliding.kv_window == WINDOW and facts("qwen3").windows == (None, None)


def test_a_model_whose_every_layer_slides_frees_old_blocks(model_dir, expected):
    """Phi-3 with a sliding window of 8 (every layer): a sequence holds the blocks of its window,
    not of its length, so a pool too small for the sequences' full lengths runs them all at once,
    and the output is still transformers'."""
    loaded = load_model(model_dir("phi3-sliding"))
    prompts = _prompts(loaded.model.config.vocab_size)
    bs = 4
    # the longest sequence (30 + 32) alone would need 16 blocks; 5 sequences fit in 40 only by dropping
    engine = Engine(loaded, EngineConfig(block_size=bs, kv_blocks=40, async_decode=False))
    assert engine.scheduler.kv_window == WINDOW
    seqs = [engine.add(p, SamplingParams(max_tokens=32)) for p in prompts]
    peak = 0
    while engine.scheduler.has_work():
        engine.step()
        engine.blocks.check_invariants(engine.scheduler.running)
        for s in engine.scheduler.running:
            held = len(s.block_table) - engine.blocks.num_dropped(s)
            peak = max(peak, held)
            # the window, the step's new position and the draft's re-read: at most 3 blocks beyond
            assert held <= -(-(WINDOW + 2) // bs) + 1, (s.seq_id, len(s), held)
    assert [s.output_ids for s in seqs] == expected("phi3-sliding", loaded.model)
    assert sum(s.num_preemptions for s in seqs) == 0 and peak > 0
    assert engine.blocks.num_used == 0


def test_interleaved_global_layers_keep_every_block(model_dir):
    """Gemma 2's global layers read every position: nothing is dropped (kv_window None)."""
    loaded = load_model(model_dir("gemma2"))
    engine = Engine(loaded, EngineConfig(block_size=4))
    assert engine.scheduler.kv_window is None
    seq = engine.add(_prompts(loaded.model.config.vocab_size)[4], SamplingParams(max_tokens=20))
    while engine.scheduler.has_work():
        engine.step()
        if engine.scheduler.running:
            assert engine.blocks.num_dropped(seq) == 0 and len(seq.block_table) >= (len(seq) - 1) // 4
    assert seq.num_output == 20


@pytest.mark.parametrize("name", ["gemma2", "phi3-sliding"])
@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_speculative_greedy_equals_plain_greedy(model_dir, name, mode):
    """Verification over windows and capped scores (S = k + 1 rows per sequence); a model drafting
    for itself re-reads position len - 2, which the dropped blocks of a sliding model must keep."""
    loaded = load_model(model_dir(name))
    prompts = [p + p[:6] for p in _prompts(loaded.model.config.vocab_size)]
    params = SamplingParams(max_tokens=32)
    plain = [s.output_ids for s in Engine(loaded, EngineConfig(block_size=4)).generate(prompts, params)]
    engine = Engine(loaded, EngineConfig(block_size=4, speculative=mode, num_draft=3),
                    draft=loaded if mode == "draft" else None)
    assert [s.output_ids for s in engine.generate(prompts, params)] == plain
    assert engine.stats.verify_rows > 0 and engine.blocks.num_used == 0
    if mode == "draft":
        assert engine.stats.accepted == engine.stats.proposed


@pytest.mark.parametrize("name", ["gemma2", "phi3", "qwen3"])
def test_w4a16_checkpoint_runs_on_its_own_modules(model_dir, tmp_path, name):
    """Gemma's (1 + w) norms run unfused in front of the quantized linears; Phi-3's packed linears and
    Qwen3's go through the fused norm + matmul entry point."""
    from quantkit.api import load, quantize
    from quantkit.nn.quant_linear import IntWeightLinear

    quantize(str(model_dir(name)), "w4a16-rtn", tmp_path / "w4", show_progress=False)
    loaded = load(tmp_path / "w4")
    assert any(type(m) is IntWeightLinear for m in loaded.model.modules())
    prompts = _prompts(loaded.model.config.vocab_size)[2:]
    expected = [_hf_greedy(loaded.model, p, 32) for p in prompts]
    seqs = Engine(loaded, EngineConfig(block_size=4)).generate(prompts, SamplingParams(max_tokens=32))
    assert [s.output_ids for s in seqs] == expected


def test_rope_that_changes_past_a_length_is_limited_to_it(model_dir):
    loaded = load_model(model_dir("phi3-longrope"))
    with pytest.raises(ValueError, match="longrope RoPE changes its frequencies past 64 positions"):
        Engine(loaded, EngineConfig(max_model_len=128))
    with pytest.raises(ValueError, match="max_model_len <= 60"):
        Engine(loaded, EngineConfig(max_model_len=64, speculative="ngram", num_draft=4))
    loaded.model.config.rope_parameters = {**loaded.model.config.rope_parameters, "rope_type": "dynamic"}
    with pytest.raises(ValueError, match="dynamic RoPE changes its frequencies past 256 positions"):
        Engine(loaded, EngineConfig(max_model_len=300))


def test_speed_runs_on_the_cpu(model_dir):
    from quantkit import api

    for name in ("gemma3", "phi3-sliding"):
        rows = api.speed(model_dir(name), batch_sizes=(1, 3), prompt_len=20, output_len=12, device="cpu")
        assert [r["output_tokens"] for r in rows] == [12, 36]
        assert all(r["tokens_per_s"] > 0 for r in rows)
