"""Shared fixtures: a tiny random Llama (fast unit tests) and the real SmolLM2 (end to end)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantkit import calibration as cal


def _tiny_tokenizer():
    """A byte-level BPE trained in memory on Austen (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = (cal.BUNDLED_DIR / cal.bundled_datasets()["austen"]["file"]).read_text("utf-8")[:30_000]
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_tiny_model(folder: Path, seed: int = 0, tie: bool = True, **overrides) -> Path:
    """Save a random Llama (2 blocks unless `overrides` say) whose widths exercise partial groups (in=96)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer()
    fields = dict(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tie, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    config = LlamaConfig(**(fields | overrides))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


# Tiny random models of the other families (issue 20): GQA, head_dim 24, a sliding window of
# 8 tokens where the family has one (shorter than the test sequences), Gemma's soft-capping
# and query scale set off their defaults so that a forgotten one shows. Norm weights are
# drawn at random around the family's identity, so that a fold into a norm is not a fold
# into ones (or Gemma's zeros).
FAMILY_CONFIGS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=24, num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=16,
        final_logit_softcapping=1.0, attn_logit_softcapping=5.0, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=24, num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=16,
        final_logit_softcapping=1.0, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False)),
    # mixtures of experts, 4 experts each, top-2: Mixtral, Qwen2-MoE (with a shared expert),
    # Qwen3-MoE (normalized top-k weights, its middle layer a dense MLP: mlp_only_layers)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=96,
        tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=24, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False)),
}


def random_model(config_name: str, model_name: str, fields: dict, seed: int = 0, norm_noise: float = 0.2):
    """transformers' `model_name` with random weights under `config_name(**fields)`, eval mode, its
    norm weights moved by norm_noise * N(0, 1) away from the family's identity (so that a norm's
    weight, (1 + w) or w, shows in the output)."""
    import transformers

    config = getattr(transformers, config_name)(**fields)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(norm_noise * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (use: pytestmark = usefixtures("one_thread")):
    their ops are too small to share among threads; on a busy 2-core machine two threads made the
    MoE layers' many small expert matmuls wait on each other (test_gguf_families: 40 s -> 90 s).
    Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    """40,000 characters of the bundled calibration text: tokenizing all 3 MB with the tiny
    tokenizer would take longer than quantizing."""
    path = tmp_path_factory.mktemp("calib") / "austen-head.txt"
    text = (cal.BUNDLED_DIR / cal.bundled_datasets()["austen"]["file"]).read_text("utf-8")
    path.write_text(text[:40_000], "utf-8")
    return path


def make_tiny_family_model(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """Save a tiny random model of `family` (a key of FAMILY_CONFIGS) with the tiny tokenizer."""
    config_name, model_name, extra = FAMILY_CONFIGS[family]
    tokenizer = _tiny_tokenizer()
    fields = dict(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = random_model(config_name, model_name, {**fields, **extra, **overrides}, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def verification_distributions(loaded, engine_config, prompt: list[int], device: str = "cpu"):
    """Prefill `prompt` in an engine, then one step of 3 tokens (the verification shape) at
    temperature 1: the engine's distributions [3, V], and the softmax of transformers' logits of the
    same modules at the same positions."""
    from quantkit.engine.engine import Engine
    from quantkit.engine.sequence import SamplingParams

    engine = Engine(loaded, engine_config)
    seq = engine.add(prompt, SamplingParams(max_tokens=8))
    engine.step()  # prefill
    tokens = [seq.last_token, 7, 11]
    engine.blocks.append_slots(seq, 3)
    x = engine._inputs([seq], [len(seq) - 1], 3, [tokens])
    x.temperature[:] = 1.0
    p, _ = engine.target_step(x, draw=False)
    with torch.no_grad():
        logits = loaded.model(torch.tensor([seq.token_ids + tokens[1:]], device=device)).logits[0, -3:].float()
    return p[0], torch.softmax(logits, -1)


def refused_rotation(family: str, recipe_name: str) -> str | None:
    """What quantkit says when `recipe_name` rotates a model of `family` it cannot rotate (None: it can):
    Gemma's norms after attention and MLP do not commute with a rotation; an online rotation of a
    mixture of experts' down_proj has no per-expert module in transformers to be recorded on."""
    from quantkit.recipe import load_recipe

    steps = {s.name: s.kwargs() for s in load_recipe(recipe_name).algorithms}
    if "rotate" not in steps:
        return None
    if family.startswith("gemma"):
        return "do not commute"
    if steps["rotate"].get("online") and family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        return "fused module"
    return None


def assert_rotation_refused(why: str, quantize, out: Path) -> None:
    """`quantize()` (writing `out`) ends in the one clear UnsupportedModelError matching `why`, and
    nothing is written: no output, no temporary folder beside it."""
    from quantkit.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=why):
        quantize()
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def w8a8_copy(loaded, spec, act):
    """`loaded` (a Llama) with every block linear replaced by its W8A8 round to nearest under (spec, act)."""
    from quantkit.formats import quantize_rtn
    from quantkit.models.families import LLAMA
    from quantkit.nn import W8A8Linear

    for block in loaded.model.model.layers:
        for name in LLAMA.linears:
            parent, attr = name.rsplit(".", 1)
            owner = block.get_submodule(parent)
            lin = getattr(owner, attr)
            qw = quantize_rtn(lin.weight.detach(), spec)
            q = W8A8Linear(lin.in_features, lin.out_features, spec, act, dtype=lin.weight.dtype, device=lin.weight.device)
            q.weight.copy_(qw.q)
            q.weight_scale.copy_(qw.scale.reshape(q.weight_scale.shape))
            setattr(owner, attr, q)
    return loaded


def engine_runs(loaded, prompts: list[list[int]], params, config):
    """The engine's outputs of `prompts` (SamplingParams `params`, EngineConfig `config`) and its prefill
    logits of the first prompt."""
    from quantkit.engine.engine import Engine
    from quantkit.engine.runner import PrefillChunk

    engine = Engine(loaded, config)
    outputs = [s.output_ids for s in engine.generate(prompts, params)]
    logits = engine.runner.prefill([PrefillChunk(prompts[0], 0, list(range(len(prompts[0]))))])
    return outputs, logits
