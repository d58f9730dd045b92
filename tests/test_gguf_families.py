"""GGUF input for every family quantkit shares with transformers' GGUF reader (issue 20, point 5).

For each model type that both quantkit's FAMILIES and transformers' GGUF reader know (read from both at
collection time, so a family added to either is covered without editing this file), a tiny random model
is built with transformers' own config class, saved with save_pretrained, and written again as a GGUF
file the way llama.cpp's convert_hf_to_gguf.py writes that architecture: its metadata keys, gguf-py's
tensor names, and its tensor transforms (Llama's q/k rows reordered for llama.cpp's interleaved
rotary, Gemma's norms stored as 1 + w, each MoE layer's experts stacked into ffn_{gate,up,down}_exps,
size-1 dimensions squeezed), with every tensor in F32 so that no quantization noise enters. Then:
quantkit loads the .gguf as the same model as the folder (same family, same logits), and quantizes
from it end to end.

transformers' reader (the legacy path, modeling_gguf_pytorch_utils + integrations/ggml.py
GGUF_CONFIG_MAPPING) rebuilds the config from a fixed set of keys per architecture; every other field
takes the config class's default, whatever the file says. quantkit's load_config compares the file's
keys with that config (quantkit.models.gguf_meta) and repairs what one config field carries or refuses
the file. test_what_the_reader_loses pins each loss that a real checkpoint can hit, by name, with what
quantkit does about it; the tiny models below keep the fields that quantkit would refuse at the
values the reader gives back (noted where it matters).

transformers also rebuilds the tokenizer from the file's vocabulary, with a converter per architecture,
and quantkit checks the one it builds against the file (quantkit.models.gguf_tokenizer). Where the
installed transformers builds a tokenizer that is not the one the file was written from (5.17: its
Gemma, Llama and Phi-3 converters fail on these byte-level BPE files, its Qwen one gives them an EOS of
its own), the expected outcome of every load is quantkit's ModelLoadError saying so
(tokenizer_refused): told by that behaviour, not by a list of versions.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

from conftest import _tiny_tokenizer, random_model
from quantkit import api
from quantkit.errors import ModelLoadError
from quantkit.models import FAMILIES, family_for, load_model
from quantkit.models.gguf_meta import GGUFArray, GGUFMeta, check_gguf_config, iter_gguf_strings, read_gguf_meta
from quantkit.models.gguf_tokenizer import check_gguf_tokenizer, load_gguf_tokenizer, whole_word_pieces
from quantkit.models.loader import load_config
from quantkit.pipeline import quantize_model
from quantkit.recipe import load_recipe

# ----------------------------------------------------------------------------- which model types

# transformers' reader names its architectures by model_type, except that it turns a file's gemma3
# into the text-only gemma3_text (modeling_gguf_pytorch_utils.load_gguf_checkpoint)
_READER_MODEL_TYPE = {"gemma3": "gemma3_text"}
READER_MODEL_TYPES = {_READER_MODEL_TYPE.get(k, k) for k in GGUF_CONFIG_MAPPING}
SHARED = sorted(t for f in FAMILIES.values() for t in f.model_types if t in READER_MODEL_TYPES)

# llama.cpp's general.architecture for a model type, where it is another name (Mistral and Mixtral
# are written as llamas)
GGUF_ARCH = {"mistral": "llama", "mixtral": "llama", "gemma3_text": "gemma3", "qwen2_moe": "qwen2moe",
             "qwen3_moe": "qwen3moe"}
# The file of a Mistral is a llama named after the model ("Mistral-7B-Instruct-v0.3"): the reader gives
# it back as model_type llama (quantkit's llama family, the same computation). Named exactly
# "mistral", the reader would make it a mistral and then fail (test_a_gguf_named_mistral_is_refused).
GGUF_NAME = {"mistral": "Mistral-7B-Instruct-v0.3"}
READ_AS = {"mistral": "llama"}

# Tiny models: hidden 64, 4 heads over 2 KV heads (GQA), rotary base and norm eps off the class
# defaults (the file carries them), norm weights drawn around the family's identity (so Gemma's
# 1 + w and Qwen3's q/k norms are exercised). Fields the reader cannot carry stay at the class
# default: Qwen3's head_dim (128), the Qwen-MoE expert widths (1408 / 5632, 768), Gemma's
# soft-capping and layer pattern (every 2nd / every 6th layer global: Gemma 3 gets 6 layers so that
# one is global, with its own rotary base), and Gemma's head width 256 with query_pre_attn_scalar 256,
# the one scale that transformers (256 always) and llama.cpp (the head width) agree on; see
# test_what_the_reader_loses. Phi-3's window of 8 is one the reader drops and quantkit repairs: the
# tiny Phi-3 proves that repair here, as its file needs > 32000 tokens (seconds to parse) to load.
_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=25_000.0,
               tie_word_embeddings=False, bos_token_id=None)
TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=128)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=8, tie_word_embeddings=True)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=6, sliding_window=8, rope_theta=500_000.0, tie_word_embeddings=True)),
    # Phi-3's embedding has 32064 rows, as the real one: the reader leaves pad_token_id at the class's 32000
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(vocab_size=32064, sliding_window=8)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)),
    # not one the reader knows: test_a_mixtral_gguf_is_refused
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
}

IDS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(7))  # beyond the 8-token windows
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


@functools.lru_cache(maxsize=1)
def tokenizer():
    return _tiny_tokenizer()


def make_tiny(model_type: str, seed: int = 0, **overrides):
    config_name, model_name, extra = TINY[model_type]
    tok = tokenizer()
    fields = {**_COMMON, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "pad_token_id": tok.eos_token_id}
    return random_model(config_name, model_name, {**fields, **extra, **overrides}, seed)


# ----------------------------------------------------------------------------- the GGUF writer

def _interleave_rotary_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp rotates (x[2i], x[2i+1]) pairs, transformers' Llama rotates (x[i], x[i + d/2]):
    within each head, rows [first half, second half] become [h0[0], h1[0], h0[1], h1[1], ...]."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope(config) -> dict:
    rope = dict(config.rope_parameters or {})
    return rope.get("full_attention", rope)  # Gemma 3: the file's rotary base is the global layers'


def _llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel: the divisor of each rotary frequency under "llama3" scaling."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    old, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(rope["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.asarray(factors, dtype=np.float32)


def write_gguf(model, tok, path: Path, name: str | None = None, bos: str | None = None) -> Path:
    """Write `model` (a transformers *ForCausalLM) and `tok` (a byte-level BPE) as llama.cpp's
    convert_hf_to_gguf.py would, every tensor F32; with `bos` (a token of `tok`), a model that
    starts every text with that BOS (tokenizer.ggml.bos_token_id, add_bos_token true)."""
    config = model.config
    model_type = config.model_type
    arch = GGUF_ARCH.get(model_type, model_type)
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = _rope(config)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("model")
    w.add_name(name if name is not None else GGUF_NAME.get(model_type, f"tiny-{model_type}"))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if rope.get("rope_type", "default") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if rope.get("rope_type") == "llama3":  # no key: the per-dimension factors as a tensor (Llama 3.1, 3.2)
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(rope, head_dim))
    if rope.get("rope_type") == "longrope":  # Phi-3 128k, Phi-3.5, Phi-4-mini: an attention factor, two tensors
        scale = config.max_position_embeddings / rope["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(rope["original_max_position_embeddings"])) if scale > 1 else 1.0)
        w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))
    if getattr(config, "sliding_window", None) and arch in ("gemma2", "gemma3", "phi3"):
        w.add_sliding_window(config.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(config.attn_logit_softcapping)
        w.add_final_logit_softcapping(config.final_logit_softcapping)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if experts:  # Mixtral's experts are intermediate_size wide (feed_forward_length), Qwen's have their own
        w.add_expert_count(experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        if hasattr(config, "moe_intermediate_size"):
            w.add_expert_feed_forward_length(config.moe_intermediate_size)
        if hasattr(config, "shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)

    # the vocabulary: byte-level BPE ("gpt2"), its tokens in id order, its merges, special tokens as CONTROL
    # (llama.cpp pads the list to the embedding's rows with [PAD<id>] tokens of type UNUSED)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))) and len(tokens) <= config.vocab_size
    special = set(tok.all_special_ids)
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    pad = range(len(tokens), config.vocab_size)
    tokens, types = tokens + [f"[PAD{i}]" for i in pad], types + [gguf.TokenType.UNUSED for _ in pad]
    assert len(tokens) == model.get_input_embeddings().weight.shape[0]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    if bos is not None:
        w.add_bos_token_id(tok.convert_tokens_to_ids(bos))
    w.add_add_bos_token(bos is not None)

    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)

    def gguf_name(hf: str) -> str:
        mapped = names.get_name(hf)
        assert mapped is not None, f"gguf-py has no {arch} tensor for {hf}"
        return mapped

    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings; the reader ties on its absence
        data = tensor.detach().float()
        if hf_name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            # transformers holds a layer's experts fused: gate_up_proj [E, 2I, H] (gate rows first),
            # down_proj [E, H, I]; llama.cpp stacks each expert's [out, in] weight into one 3D tensor
            prefix = hf_name.rsplit(".", 1)[0]
            if hf_name.endswith("gate_up_proj"):
                gate, up = data.chunk(2, dim=1)
                parts = {"gate_proj": gate, "up_proj": up}
            else:
                parts = {"down_proj": data}
            for part, stacked in parts.items():
                w.add_tensor(gguf_name(f"{prefix}.{part}") + ".weight", stacked.contiguous().numpy())
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = gguf_name(base)
        if arch == "llama" and name.endswith((".attn_q", ".attn_k")) and suffix == "weight":
            heads = config.num_attention_heads if name.endswith("q") else config.num_key_value_heads
            data = _interleave_rotary_rows(data, heads)
        if arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight"):
            data = data + 1  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores the factor
        w.add_tensor(f"{name}.{suffix}", np.ascontiguousarray(data.squeeze().numpy()))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ----------------------------------------------------------------------------- built once per session

_BUILT: dict[str, tuple[Path, Path]] = {}


def built(tmp_path_factory, model_type: str) -> tuple[Path, Path]:
    """(the save_pretrained folder, the .gguf file in a folder of its own) of the tiny model."""
    if model_type not in TINY:
        pytest.fail(f"{model_type} is in quantkit's FAMILIES and transformers' GGUF reader, "
                    f"but this test has no tiny model for it: add it to TINY")
    if model_type not in _BUILT:
        root = tmp_path_factory.mktemp(f"gguf-{model_type}")
        model = make_tiny(model_type)
        model.save_pretrained(root / "hf")
        tokenizer().save_pretrained(root / "hf")
        (root / "gguf").mkdir()  # a folder of its own: nothing of the saved model beside the file
        path = write_gguf(model, tokenizer(), root / "gguf" / f"tiny-{model_type}-f32.gguf")
        _BUILT[model_type] = (root / "hf", path)
    return _BUILT[model_type]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


def logits(loaded) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(IDS).logits.float()


@functools.lru_cache(maxsize=None)
def transformers_tokenizer(path: Path):
    """The tokenizer the installed transformers builds from the GGUF file `path` (no check), or
    (a str) why it cannot."""
    try:
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - a converter that fails: whatever it raises
        return f"its converter fails: {type(e).__name__}: {str(e)[:120]}"


def _transformers_tokenizer_differs(path: Path) -> str | None:
    """Why the tokenizer the installed transformers builds from the tiny GGUF file `path` is not the
    one the file was written from (tokenizer()): None where it gives TEXT the same ids."""
    built_tok = transformers_tokenizer(path)
    if isinstance(built_tok, str):
        return built_tok
    want = tokenizer()
    # BOS / EOS ids alone are repaired (check_gguf_tokenizer): what must match is the tokens of TEXT
    got = [(built_tok(TEXT).input_ids, built_tok.bos_token_id, built_tok.eos_token_id)]
    if got[0][0] != want(TEXT).input_ids:
        return (f"it encodes TEXT as {built_tok.convert_ids_to_tokens(got[0][0][:6])}..., BOS {got[0][1]}, "
                f"EOS {got[0][2]} (the file's: {want.convert_ids_to_tokens(want(TEXT).input_ids[:6])}..., "
                f"BOS {want.bos_token_id}, EOS {want.eos_token_id})")
    return None


def tokenizer_refused(path: Path, load) -> bool:
    """False where transformers builds the tokenizer of the tiny GGUF file `path` right. Else (5.17)
    `load()` must raise quantkit's ModelLoadError that names the file, the installed transformers and
    the way out, and the caller's test ends there (True)."""
    why = _transformers_tokenizer_differs(Path(path))
    if why is None:
        return False
    with pytest.raises(ModelLoadError) as refusal:
        load()
    message = str(refusal.value)
    for part in (str(path), f"transformers {transformers.__version__} is installed", "Upgrade transformers",
                 "tokenizer.json"):
        assert part in message, (part, message)
    print(f"{Path(path).name}: transformers {transformers.__version__}'s tokenizer: {why}; quantkit: {message}")
    return True


# ----------------------------------------------------------------------------- tests

def test_the_shared_families_cover_the_dense_ones():
    """The parametrization below is FAMILIES x the reader's architectures; the families that
    transformers' reader names must all be there (mixtral is not: see test_a_mixtral_gguf_is_refused)."""
    assert {"qwen3", "gemma2", "gemma3_text", "phi3"} <= set(SHARED)
    assert {"llama", "mistral", "qwen2"} <= set(SHARED)
    moe = {t for t in ("qwen2_moe", "qwen3_moe") if any(t in f.model_types for f in FAMILIES.values())}
    assert moe <= set(SHARED)  # the MoE families, once quantkit has them
    assert "mixtral" not in READER_MODEL_TYPES


# which config fields the reader carries for each architecture (GGUF_CONFIG_MAPPING), to compare
_CARRIED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
            "sliding_window", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "shared_expert_intermediate_size", "norm_topk_prob", "layer_types", "rope_parameters")


@pytest.mark.parametrize("model_type", SHARED)
def test_gguf_loads_as_the_same_model(tmp_path_factory, model_type):
    """The .gguf loads as the saved folder's model: its family, the config fields the file carries,
    the tokenizer, and the same logits (float32, every weight F32 in the file)."""
    folder, path = built(tmp_path_factory, model_type)
    if tokenizer_refused(path, lambda: load_model(path, config=load_config(path))):
        return
    from_gguf, from_folder = load_model(path, config=load_config(path)), load_model(folder)
    assert from_gguf.model.config.model_type == READ_AS.get(model_type, model_type)
    assert from_gguf.family is from_folder.family is family_for(from_folder.model.config)
    assert model_type in from_gguf.family.model_types
    for field in _CARRIED:
        if hasattr(from_folder.model.config, field) and hasattr(from_gguf.model.config, field):
            want = getattr(from_folder.model.config, field)
            if isinstance(want, float):  # GGUF holds float keys as float32: 1e-5 reads back as 9.9999997e-06
                want = pytest.approx(want, rel=1e-6)
            assert getattr(from_gguf.model.config, field) == want, field
    assert next(from_gguf.model.parameters()).dtype == torch.float32
    assert from_gguf.tokenizer(TEXT).input_ids == from_folder.tokenizer(TEXT).input_ids
    assert from_gguf.tokenizer.eos_token == from_folder.tokenizer.eos_token == "<eos>"
    assert from_gguf.model.config.eos_token_id == from_folder.model.config.eos_token_id
    a, b = logits(from_gguf), logits(from_folder)
    print(f"{model_type}: max |logits(gguf) - logits(folder)| = {(a - b).abs().max().item():.3g}")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", SHARED)
def test_quantize_from_gguf(tmp_path_factory, tmp_path, small_text, model_type):
    """w4a16-rtn from the .gguf: the checkpoint reads back to the logits of the float model with
    its linears fake-quantized by the same recipe."""
    folder, path = built(tmp_path_factory, model_type)
    out = tmp_path / "q"
    if tokenizer_refused(path, lambda: api.quantize(str(path), "w4a16-rtn", out, calib_data=str(small_text),
                                                    show_progress=False)):
        return
    report = api.quantize(str(path), "w4a16-rtn", out, calib_data=str(small_text), show_progress=False)
    assert report["held_out"]["passed"]
    assert json.loads((out / "config.json").read_text())["model_type"] == READ_AS.get(model_type, model_type)
    quantized = api.load(out)
    # the float model from the folder: test_gguf_loads_as_the_same_model shows it is the .gguf's
    # (and parsing a GGUF's metadata again takes seconds with Phi-3's 32064 tokens)
    fake = load_model(folder)
    quantize_model(fake, load_recipe("w4a16-rtn"))
    a, b = logits(quantized), logits(fake)
    assert torch.isfinite(a).all()
    print(f"{model_type}: max |logits(checkpoint) - logits(fake-quantized)| = {(a - b).abs().max().item():.3g}")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_mixtral_gguf_is_refused(tmp_path):
    """llama.cpp writes a Mixtral as general.architecture "llama" with expert_count and stacked
    ffn_*_exps tensors. transformers' reader has no mixture of experts under "llama": it builds a
    dense LlamaForCausalLM, whose MLP weights the file does not hold. quantkit refuses it by name
    (transformers alone would fill the MLPs with random values) instead of quantizing noise. A
    Mixtral reaches quantkit as a Hugging Face folder only."""
    path = write_gguf(make_tiny("mixtral"), tokenizer(), tmp_path / "tiny-mixtral-f32.gguf")
    assert load_config(path).model_type == "llama"
    if tokenizer_refused(path, lambda: load_model(path)):  # the tokenizer is built before the weights
        return
    with pytest.raises(ModelLoadError, match=r"its weight files lack model\.layers\.0\.mlp\.(down|gate|up)_proj"):
        load_model(path)


# What transformers' reader (5.25 and 5.17, the legacy path) cannot carry, each written the way llama.cpp
# writes it, and what quantkit does about it: (tiny model overrides, {config field: what the reader
# builds, "rope.X" for a rotary parameter}, then), then being
# - REPAIRED: load_config sets each field to the file's value, with a note, and the .gguf loads with the
#   source model's logits (the file's model, not another);
# - refused(...): load_config raises one ModelLoadError naming the file and, for each key, the file's
#   value and transformers'; silent: transformers alone loads the file as another model (the same
#   weights, other logits), which is what the refusal prevents;
# - ("load_model", message, fields): load_config repairs those fields and passes, and load_model raises a
#   ModelLoadError with that message.
REPAIRED = "repaired"


def refused(*parts: str, silent: bool) -> tuple:
    return ("refused", parts, silent)


_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 25_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
_LONGROPE = {"rope_type": "longrope", "rope_theta": 25_000.0, "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
             "original_max_position_embeddings": 16, "partial_rotary_factor": 1.0}

LOSSES = [
    # -- repaired: one config field carries the key, with one meaning
    # qwen3.attention.key_length is not in the reader's qwen3 keys: head_dim is Qwen3Config's 128
    # (every released Qwen3 has 128); any other width fails to load (size mismatch)
    pytest.param("qwen3", dict(head_dim=16), {"head_dim": 128}, REPAIRED, id="qwen3-head_dim"),
    # {arch}.expert_feed_forward_length and expert_shared_feed_forward_length are not read: the expert
    # widths are the class defaults (Qwen1.5-MoE-A2.7B's, Qwen3-30B-A3B's); other widths fail to load
    pytest.param("qwen2_moe", dict(moe_intermediate_size=32, shared_expert_intermediate_size=48),
                 {"moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632}, REPAIRED,
                 id="qwen2_moe-expert-widths"),
    pytest.param("qwen3_moe", dict(moe_intermediate_size=32), {"moe_intermediate_size": 768}, REPAIRED,
                 id="qwen3_moe-expert-width"),
    # gemma2.attn_logit_softcapping / final_logit_softcapping are not read: 50 / 30 (every Gemma 2's);
    # other values load silently as another model
    pytest.param("gemma2", dict(attn_logit_softcapping=5.0, final_logit_softcapping=1.0),
                 {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}, REPAIRED, id="gemma2-softcaps"),
    # (phi3.attention.sliding_window is not read either (Phi-3-mini has 2047): repaired, proven by the tiny
    # Phi-3's window of 8 in test_gguf_loads_as_the_same_model, as a phi3 file loads only with > 32000 tokens)

    # -- refused: what the file says needs more than one field, or the file does not say it
    # query_pre_attn_scalar is in no GGUF file: transformers builds 256 always, llama.cpp runs a Gemma 27B
    # (told by its 46 / 62 layers) with hidden / heads (Gemma 2 27B: 144, Gemma 3 27B: 168) and any other
    # with the head width. Where the two differ, the file does not say which model it is (here a head
    # width of 16; the real shapes: test_the_query_scale_of_the_real_gemmas)
    pytest.param("gemma3_text", dict(head_dim=16, query_pre_attn_scalar=16), {"query_pre_attn_scalar": 256},
                 refused("query_pre_attn_scalar", "llama.cpp runs this file with 16, transformers built 256",
                         silent=True), id="gemma3-query-scale"),
    # gemma3.rope.scaling.type / factor are not read: the global layers' linear scaling of Gemma 3
    # 4B / 12B / 27B (factor 8) is lost (a type and a factor, in the parameters of one layer type)
    pytest.param("gemma3_text", dict(
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
        {"rope.rope_type": "default", "rope.factor": None},
        refused("gemma3.rope.scaling.type", "the file says 'linear', transformers built 'none'",
                "gemma3.rope.scaling.factor", "the file says 8.0, transformers built None", silent=True),
        id="gemma3-rope-scaling"),
    # Llama 3.1 / 3.2's "llama3" rope scaling is in no key: llama.cpp writes its per-dimension factors as
    # the tensor rope_freqs.weight, which the reader skips
    pytest.param("llama", dict(rope_parameters=_LLAMA3_ROPE), {"rope.rope_type": "default"},
                 refused("llama.rope.scaling.type", "the file says 'llama3', transformers built 'none'", silent=True),
                 id="llama3-rope-scaling"),
    # phi3.rope.dimension_count is not read: full rotary where Phi-4-mini rotates 3/4 of each head
    pytest.param("phi3", dict(partial_rotary_factor=0.5, vocab_size=300), {"rope.partial_rotary_factor": 1.0},
                 refused("phi3.rope.dimension_count", "the file says 8, transformers built 16", silent=False),
                 id="phi3-partial-rotary"),
    # Phi-3 128k / Phi-3.5 / Phi-4-mini's longrope: an attention factor key and two factor tensors, not read
    pytest.param("phi3", dict(rope_parameters=_LONGROPE, original_max_position_embeddings=16, vocab_size=300),
                 {"rope.rope_type": "default"},
                 refused("phi3.rope.scaling.type", "the file says 'longrope', transformers built 'none'",
                         "phi3.rope.scaling.attn_factor", silent=False), id="phi3-longrope"),

    # -- cannot load: pad_token_id is not read into the config (it goes to the tokenizer only): Phi3Config's
    # 32000, which must be a row of the embedding, so a phi3 file of 32000 tokens or fewer cannot load
    # (torch asserts while transformers builds it: a ModelLoadError). The tiny Phi-3 has 32064 rows for this,
    # and a window of 8 (phi3.attention.sliding_window), which the reader drops too and quantkit repairs
    pytest.param("phi3", dict(vocab_size=300), {"pad_token_id": 32000, "sliding_window": None},
                 ("load_model", "pad_token_id 32000 is no row of its 300-token embedding.*"
                                "Padding_idx must be within num_embeddings", ["sliding_window"]),
                 id="phi3-pad-token-window"),
]


@contextmanager
def quantkit_notes():
    """The notes the library logs on the "quantkit" logger (the CLI prints each as a `note:` line)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("quantkit")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _built(config, field: str):
    """A config field, or ("rope.X") a rotary parameter (Gemma 3's: its full-attention layers')."""
    if field.startswith("rope."):
        rope = config.rope_parameters
        return rope.get("full_attention", rope).get(field[len("rope."):])
    return getattr(config, field)


@pytest.mark.parametrize("model_type,overrides,reader_builds,then", LOSSES)
def test_what_the_reader_loses(tmp_path, model_type, overrides, reader_builds, then):
    source = make_tiny(model_type, **overrides)
    path = write_gguf(source, tokenizer(), tmp_path / f"{model_type}.gguf")
    # what transformers' reader alone builds (a transformers that reads the key fails here: update the table)
    raw = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    for field, value in reader_builds.items():
        assert _built(raw, field) == value, field
    with torch.inference_mode():
        want = source(IDS).logits.float()
    if then == REPAIRED:
        with quantkit_notes() as notes:
            config = load_config(path)
        for field in reader_builds:
            assert getattr(config, field) == getattr(source.config, field), field
            told = [n.getMessage() for n in notes if f"config.{field} = " in n.getMessage()]
            assert len(told) == 1 and path.name in told[0], (field, [n.getMessage() for n in notes])
        if tokenizer_refused(path, lambda: load_model(path, config=config)):
            return
        loaded = load_model(path, config=config)
        print(f"{model_type} repaired: max |logits(gguf) - logits(source)| = {(logits(loaded) - want).abs().max():.3g}")
        torch.testing.assert_close(logits(loaded), want, rtol=1e-5, atol=1e-5)
        return
    if then[0] == "load_model":
        config = load_config(path)
        for field in then[2]:
            assert getattr(config, field) == getattr(source.config, field), field
        if tokenizer_refused(path, lambda: load_model(path, config=config)):  # built before the weights
            return
        with pytest.raises(ModelLoadError, match=then[1]):
            load_model(path, config=config)
        return
    _, parts, silent = then
    with pytest.raises(ModelLoadError) as refusal:
        load_config(path)
    message = str(refusal.value)
    for part in (str(path), *parts, "Load the original safetensors checkpoint"):
        assert part in message, (part, message)
    if silent:  # what the refusal prevents: transformers alone loads the file as another model (the same
        # model's logits agree within 1e-5; these random tiny ones differ by 6e-3 (llama3 rope) and more)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
        with torch.inference_mode():
            assert (model(IDS).logits.float() - want).abs().max() > 1e-3


@pytest.mark.parametrize("arch,layers,hidden,heads,head_dim,scalar", [
    ("gemma2", 26, 2304, 8, 256, 256),  # Gemma 2 2B
    ("gemma2", 42, 3584, 16, 256, 256),  # 9B
    ("gemma2", 46, 4608, 32, 128, 144),  # 27B
    ("gemma3", 18, 640, 4, 256, 256),  # Gemma 3 270M
    ("gemma3", 26, 1152, 4, 256, 256),  # 1B
    ("gemma3", 34, 2560, 8, 256, 256),  # 4B
    ("gemma3", 48, 3840, 16, 256, 256),  # 12B
    ("gemma3", 62, 5376, 32, 128, 168),  # 27B
])
def test_the_query_scale_of_the_real_gemmas(arch, layers, hidden, heads, head_dim, scalar):
    """Each released Gemma's shape as llama.cpp writes it, against the config transformers' reader
    builds from it (query_pre_attn_scalar 256, its class default): the 27Bs, whose own scalar (144,
    168) is the one llama.cpp derives, are refused; every other size loads (its scalar is 256)."""
    meta = GGUFMeta(f"{arch}.gguf", 3, {"general.architecture": arch, f"{arch}.block_count": layers,
                                        f"{arch}.embedding_length": hidden, f"{arch}.attention.head_count": heads,
                                        f"{arch}.attention.key_length": head_dim,
                                        f"{arch}.attention.value_length": head_dim})
    config_class = transformers.Gemma2Config if arch == "gemma2" else transformers.Gemma3TextConfig
    config = config_class(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, head_dim=head_dim)
    assert config.query_pre_attn_scalar == 256
    if scalar == 256:
        assert check_gguf_config(meta.path, config, meta) == []
    else:
        with pytest.raises(ModelLoadError, match=f"llama.cpp runs this file with {scalar}, transformers built 256"):
            check_gguf_config(meta.path, config, meta)


# ----------------------------------------------------------------------------- the metadata reader

def _every_value_type(path: Path) -> Path:
    """A small GGUF file with a key of every GGUF value type, arrays of several (nested too), a key
    after each array (read only if the array was skipped to its end) and two tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    t = gguf.GGUFValueType
    for key, value, vtype in [("t.u8", 200, t.UINT8), ("t.i8", -100, t.INT8), ("t.u16", 60_000, t.UINT16),
                              ("t.i16", -30_000, t.INT16), ("t.u32", 4_000_000_000, t.UINT32),
                              ("t.i32", -2_000_000_000, t.INT32), ("t.f32", 0.1, t.FLOAT32),
                              ("t.u64", 2**63 + 5, t.UINT64), ("t.i64", -2**62, t.INT64), ("t.f64", 1 / 3, t.FLOAT64),
                              ("t.true", True, t.BOOL), ("t.false", False, t.BOOL), ("t.str", "héllo ✓", t.STRING),
                              ("t.empty", "", t.STRING)]:
        w.add_key_value(key, value, vtype)
    w.add_array("t.strings", ["a", "", "ünï", "x" * 300])
    w.add_uint32("t.after_strings", 7)
    w.add_key_value("t.u8s", [1, 2, 3], t.ARRAY, sub_type=t.UINT8)
    w.add_key_value("t.f64s", [0.5, 1.5], t.ARRAY, sub_type=t.FLOAT64)
    w.add_array("t.nested", [["a", "bc"], ["d"]])
    w.add_string("t.after_nested", "the end")
    w.add_tensor("token_embd.weight", np.ones((3, 2), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.zeros(5, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_metadata_reader_agrees_with_gguf_reader(tmp_path_factory, tmp_path):
    """Every scalar key as gguf.GGUFReader reads it (the types too), every array's length, the tensor
    names; on a file of every value type and on a family's file of the tests above."""
    for path in (_every_value_type(tmp_path / "types.gguf"), built(tmp_path_factory, "qwen2_moe")[1]):
        meta, reference = read_gguf_meta(path), gguf.GGUFReader(path)
        fields = {k: f for k, f in reference.fields.items() if not k.startswith("GGUF.")}
        assert list(meta.metadata) == list(fields)
        assert meta.version == reference.fields["GGUF.version"].contents()
        for key, field in fields.items():
            mine = meta.metadata[key]
            if field.types[0] == gguf.GGUFValueType.ARRAY:
                assert isinstance(mine, GGUFArray) and mine.item_type == field.types[1].name.lower(), key
                if len(field.types) == 2:  # gguf-py reads flat arrays only
                    assert mine.length == len(field.data), key
                if field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]:
                    assert list(iter_gguf_strings(path, key, meta)) == field.contents(), key
            else:
                assert mine == field.contents() and type(mine) is type(field.contents()), key
        assert meta.tensor_names == tuple(t.name for t in reference.tensors)
    meta = read_gguf_meta(tmp_path / "types.gguf")
    assert meta.metadata["t.nested"] == GGUFArray("array", 2) and meta.metadata["t.after_nested"] == "the end"
    assert meta.metadata["t.strings"] == GGUFArray("string", 4) and meta.metadata["t.after_strings"] == 7
    assert meta.metadata["t.f32"] == pytest.approx(0.1) and meta.metadata["t.u64"] == 2**63 + 5
    assert list(iter_gguf_strings(tmp_path / "types.gguf", "t.strings")) == ["a", "", "ünï", "x" * 300]
    for key in ("t.u8s", "t.nested", "t.str", "no.such.key"):
        with pytest.raises(ModelLoadError, match=f"has no string array {key}"):
            next(iter_gguf_strings(tmp_path / "types.gguf", key))


def test_a_truncated_or_garbled_gguf_is_a_model_load_error(tmp_path):
    """Cut anywhere in the header, the key/values or the tensor entries: a ModelLoadError that says
    so, from the metadata reader and from load_config (before transformers' reader sees the file)."""
    good = _every_value_type(tmp_path / "good.gguf")
    data = good.read_bytes()
    end = gguf.GGUFReader(good).data_offset - 32  # past here only the tensor data's alignment and the data
    cut = tmp_path / "cut.gguf"
    for at in sorted({0, 3, 4, 10, 23, 24, 40, *range(41, end, 13), end - 1}):
        cut.write_bytes(data[:at])
        with pytest.raises(ModelLoadError, match="truncated"):
            read_gguf_meta(cut)
    with pytest.raises(ModelLoadError, match=r"cut\.gguf is not a readable GGUF file: .*truncated"):
        load_config(cut)
    garbled, key = tmp_path / "garbled.gguf", data.index(b"t.u8")  # then the key's value type
    for bad, message in [(b"GGML" + data[4:], "is not a GGUF file"),
                         (data[:4] + (9).to_bytes(4, "little") + data[8:], "GGUF version 9"),
                         (data[:4] + (3).to_bytes(4, "big") + data[8:], "big-endian"),
                         (data[:16] + (2**40).to_bytes(8, "little") + data[24:], "the header announces"),
                         (data[:key + 4] + (99).to_bytes(4, "little") + data[key + 8:], "value type 99")]:
        garbled.write_bytes(bad)
        with pytest.raises(ModelLoadError, match=message):
            read_gguf_meta(garbled)


def test_a_gguf_named_mistral_is_refused(tmp_path):
    """The reader makes a llama-architecture file a mistral only when general.name is exactly
    "mistral" (`"mistral" in [name]`), and then asks gguf-py for an architecture "mistral", which
    gguf 0.19 does not have (mistral3, mistral4 only): such a file cannot load. A file named after
    the model, as llama.cpp names them, loads as a llama (test_gguf_loads_as_the_same_model)."""
    path = write_gguf(make_tiny("mistral"), tokenizer(), tmp_path / "mistral.gguf", name="mistral")
    assert load_config(path).model_type == "mistral"
    if tokenizer_refused(path, lambda: load_model(path)):  # the tokenizer is built before the weights
        return
    with pytest.raises(ModelLoadError, match="Unknown gguf model_type: mistral"):
        load_model(path)


# ----------------------------------------------------------------------------- the tokenizer check

@pytest.mark.parametrize("model_type", SHARED)
def test_the_tokenizer_check_passes_every_family(tmp_path_factory, model_type):
    """quantkit's check of a GGUF tokenizer (quantkit.models.gguf_tokenizer) passes the tokenizer the
    file was written from, and the one transformers builds from it wherever that is the same
    (tokenizer_refused: else load_gguf_tokenizer refuses it)."""
    _, path = built(tmp_path_factory, model_type)
    meta = read_gguf_meta(path)
    assert whole_word_pieces(path, meta) == [(tokenizer().convert_tokens_to_ids(p), p, p[1:])
                                             for p in ("Ġthe", "Ġand", "Ġyou")]  # all the tiny vocabulary has
    check_gguf_tokenizer(path, tokenizer(), meta)
    if tokenizer_refused(path, lambda: load_gguf_tokenizer(path)):
        return
    check_gguf_tokenizer(path, transformers_tokenizer(path), meta)


def test_a_gguf_whose_model_starts_with_bos(tmp_path):
    """A file whose tokenizer.ggml.add_bos_token is true (Llama 3's, Gemma's) with its BOS id: the
    tokenizer must prepend that BOS. Where transformers' does not (5.17 on a Llama file: no BOS) or
    cannot be built, quantkit refuses the file."""
    path = write_gguf(make_tiny("llama"), tokenizer(), tmp_path / "tiny-llama-bos.gguf", bos="<eos>")
    raw = transformers_tokenizer(path)
    if isinstance(raw, str) or raw("a").input_ids[:1] != [0]:
        refusal = r"add_bos_token is true \(the model starts every text with BOS id 0\), the tokenizer encodes 'a' as "
        with pytest.raises(ModelLoadError, match=refusal + r"\['a'\] \(no BOS\)|cannot build the tokenizer"):
            load_gguf_tokenizer(path)
        return
    assert load_gguf_tokenizer(path)("a").input_ids == [0, tokenizer().convert_tokens_to_ids("a")]


def _variant(tok, *, merges: bool = True, decoder: bool = True, bos: bool = False, prepend_bos: bool = False):
    """The tiny tokenizer, broken on purpose: without its BPE merges (every word in single bytes, as
    5.17 cuts Gemma's words), without its decoder, with "<eos>" as its BOS too (prepended or not)."""
    from tokenizers import Tokenizer, processors

    spec = json.loads(tok.backend_tokenizer.to_str())
    if not merges:
        spec["model"]["merges"] = []
    if not decoder:
        spec["decoder"] = None
    backend = Tokenizer.from_str(json.dumps(spec))
    if prepend_bos:
        backend.post_processor = processors.TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 0)])
    extra = {"bos_token": "<eos>"} if bos or prepend_bos else {}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", **extra)


def _refusal(path, tok, meta, *parts):
    with pytest.raises(ModelLoadError) as refusal:
        check_gguf_tokenizer(path, tok, meta)
    message = str(refusal.value)
    for part in (str(path), *parts, f"transformers {transformers.__version__} is installed", "Upgrade transformers",
                 "which carries tokenizer.json"):
        assert part in message, (part, message)
    return message


def test_a_broken_tokenizer_is_refused(tmp_path_factory):
    """Each way a tokenizer can differ from the file's vocabulary is one ModelLoadError naming the file,
    what the file says and what the tokenizer gave: words in pieces, a BOS the file's add_bos_token
    does not ask for (or one it asks for, missing), a BOS or EOS id outside the vocabulary, a lossy
    round trip; another BOS or EOS id is repaired."""
    from dataclasses import replace

    _, path = built(tmp_path_factory, "llama")
    meta = read_gguf_meta(path)
    assert meta.metadata["tokenizer.ggml.add_bos_token"] is False and meta.metadata["tokenizer.ggml.eos_token_id"] == 0
    the = tokenizer().convert_tokens_to_ids("Ġthe")
    _refusal(path, _variant(tokenizer(), merges=False), meta,
             "of 3 whole words the file's vocabulary holds as one piece ('Ġthe', 'Ġand', 'Ġyou', ...), 3 do not",
             f"'Ġthe' (id {the}) -> ['Ġ', 't', 'h', 'e']")
    _refusal(path, _variant(tokenizer(), prepend_bos=True), meta,
             "tokenizer.ggml.add_bos_token is false (the model adds no BOS), the tokenizer encodes 'a' as "
             "['<eos>', 'a'] (with BOS)")
    says_bos = replace(meta, metadata={**meta.metadata, "tokenizer.ggml.add_bos_token": True,
                                       "tokenizer.ggml.bos_token_id": 0})
    check_gguf_tokenizer(path, _variant(tokenizer(), prepend_bos=True), says_bos)
    message = _refusal(path, _variant(tokenizer(), bos=True), says_bos,
                       "tokenizer.ggml.add_bos_token is true (the model starts every text with BOS id 0), the "
                       "tokenizer encodes 'a' as ['a'] (no BOS)")
    assert "bos_token_id" not in message  # the BOS is the file's: only its absence is told
    # another BOS / EOS id than the file's (5.17 on Qwen and SmolLM2 files): the same tokens, only the
    # stop token differs, so the tokenizer takes the file's ids and the note says so
    other_ids = replace(meta, metadata={**meta.metadata, "tokenizer.ggml.bos_token_id": 5,
                                        "tokenizer.ggml.eos_token_id": 7})
    repaired = tokenizer()
    notes = check_gguf_tokenizer(path, repaired, other_ids)
    assert (repaired.bos_token_id, repaired.eos_token_id) == (5, 7)
    assert repaired(TEXT).input_ids == tokenizer()(TEXT).input_ids
    assert len(notes) == 2 and "tokenizer.ggml.eos_token_id is 7" in notes[1] and "had 0 ('<eos>')" in notes[1]
    _refusal(path, tokenizer(), replace(meta, metadata={**meta.metadata, "tokenizer.ggml.eos_token_id": 10 ** 6}),
             "tokenizer.ggml.eos_token_id is 1000000, outside the tokenizer's")
    _refusal(path, _variant(tokenizer(), decoder=False), meta, "decode back as 'I t Ġ is Ġa")


def test_load_model_refuses_a_broken_gguf_tokenizer_before_the_weights(tmp_path_factory, monkeypatch):
    """load_model checks the tokenizer transformers builds from a .gguf before it reads any weight:
    one that cuts words into pieces, or a converter that raises (5.17's TypeError on a Gemma file),
    is a ModelLoadError, and no weight was read."""
    _, path = built(tmp_path_factory, "llama")
    config = load_config(path)
    weights_read = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: weights_read.append(a) or pytest.fail("weights read"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: _variant(tokenizer(), merges=False))
    with pytest.raises(ModelLoadError, match=r"does not encode text as the file's vocabulary does.*'Ġthe' .*"
                                             r"-> \['Ġ', 't', 'h', 'e'\].*Upgrade transformers") as refusal:
        load_model(path, config=config)
    assert str(path) in str(refusal.value)

    def fails(*args, **kwargs):
        raise TypeError("must be real number, not NoneType")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fails)
    with pytest.raises(ModelLoadError, match=r"transformers cannot build the tokenizer of this GGUF file \(a 'gpt2' "
                                             r"vocabulary, architecture 'llama': TypeError: must be real number, "
                                             r"not NoneType\) \(transformers .* is installed\)"):
        load_model(path, config=config)
    assert weights_read == []
