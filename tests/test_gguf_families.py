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
takes the config class's default, whatever the file says. The tiny models below therefore keep those
fields at their defaults (noted where it matters), and test_what_the_reader_loses pins each loss that
a real checkpoint can hit, by name.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

from conftest import _tiny_tokenizer
from quantkit import api
from quantkit import calibration as cal
from quantkit.errors import ModelLoadError
from quantkit.models import FAMILIES, family_for, load_model
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
# query_pre_attn_scalar, soft-capping and layer pattern (every 2nd / every 6th layer global: Gemma 3
# gets 6 layers so that one is global, with its own rotary base); see test_what_the_reader_loses.
_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=25_000.0,
               tie_word_embeddings=False, bos_token_id=None)
TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=128)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=8, tie_word_embeddings=True)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, num_hidden_layers=6, sliding_window=8, rope_theta=500_000.0, tie_word_embeddings=True)),
    # Phi-3's embedding has 32064 rows, as the real one: the reader leaves pad_token_id at the class's 32000
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(vocab_size=32064)),
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
    config = getattr(transformers, config_name)(**{**fields, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------- the GGUF writer

def _interleave_rotary_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp rotates (x[2i], x[2i+1]) pairs, transformers' Llama rotates (x[i], x[i + d/2]):
    within each head, rows [first half, second half] become [h0[0], h1[0], h0[1], h1[1], ...]."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope(config) -> dict:
    rope = dict(config.rope_parameters or {})
    return rope.get("full_attention", rope)  # Gemma 3: the file's rotary base is the global layers'


def write_gguf(model, tok, path: Path, name: str | None = None) -> Path:
    """Write `model` (a transformers *ForCausalLM) and `tok` (a byte-level BPE) as llama.cpp's
    convert_hf_to_gguf.py would, every tensor F32."""
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
    w.add_add_bos_token(False)

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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' ops are too small to share among threads: on this 2-core machine, busy with
    other work, two intra-op threads took this module from 40 s to 90 s (the MoE layers' many small
    expert matmuls wait on each other). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "austen-head.txt"
    path.write_text((cal.BUNDLED_DIR / cal.bundled_datasets()["austen"]["file"]).read_text("utf-8")[:40_000], "utf-8")
    return path


def logits(loaded) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(IDS).logits.float()


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
    with pytest.raises(ModelLoadError, match=r"its weight files lack model\.layers\.0\.mlp\.(down|gate|up)_proj"):
        load_model(path)


# What transformers' reader (5.25, the legacy path) cannot carry, each written the way llama.cpp writes
# it: (tiny model overrides, {config field: what the reader gives back}, what quantkit's load_model
# then does: "loads" (another model than the file's, silently) or the error it raises).
LOSSES = [
    # qwen3.attention.key_length is not in the reader's qwen3 keys: head_dim is Qwen3Config's 128
    # (every released Qwen3 has 128)
    pytest.param("qwen3", dict(head_dim=16), {"head_dim": 128}, "mismatched_sizes", id="qwen3-head_dim"),
    # {arch}.expert_feed_forward_length and expert_shared_feed_forward_length are not read: the expert
    # widths are the class defaults (Qwen1.5-MoE-A2.7B's, Qwen3-30B-A3B's); other widths cannot load
    pytest.param("qwen2_moe", dict(moe_intermediate_size=32, shared_expert_intermediate_size=48),
                 {"moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632}, "mismatched_sizes",
                 id="qwen2_moe-expert-widths"),
    pytest.param("qwen3_moe", dict(moe_intermediate_size=32), {"moe_intermediate_size": 768}, "mismatched_sizes",
                 id="qwen3_moe-expert-width"),
    # gemma2.attn_logit_softcapping / final_logit_softcapping are not read (every Gemma 2 has 50 / 30);
    # query_pre_attn_scalar is not in the file at all (llama.cpp derives the scale from the model
    # size): 256 always, where Gemma 2 27B has 144
    pytest.param("gemma2", dict(attn_logit_softcapping=5.0, final_logit_softcapping=1.0, query_pre_attn_scalar=16),
                 {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256},
                 "loads", id="gemma2-softcaps-query-scale"),
    # gemma3.rope.scaling.type / factor are not read: the global layers' linear scaling of Gemma 3
    # 4B / 12B / 27B (factor 8) is lost; query_pre_attn_scalar as for Gemma 2 (Gemma 3 27B: 168)
    pytest.param("gemma3_text", dict(
        query_pre_attn_scalar=16,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
        {"query_pre_attn_scalar": 256,
         "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}},
        "loads", id="gemma3-rope-scaling-query-scale"),
    # phi3.attention.sliding_window and rope.dimension_count are not read: no window (Phi-3-mini has
    # 2047), full rotary (Phi-4-mini rotates 3/4 of each head). Nor is pad_token_id (it goes to the
    # tokenizer only): Phi3Config's 32000, which must be a row of the embedding, so a phi3 file of
    # 32000 tokens or fewer cannot load (torch asserts; quantkit's loader lets that AssertionError
    # through, not as a ModelLoadError). The tiny models above have Phi-3's 32064 rows for this.
    pytest.param("phi3", dict(sliding_window=8, partial_rotary_factor=0.5, vocab_size=300),
                 {"sliding_window": None, "pad_token_id": 32000}, "Padding_idx must be within num_embeddings",
                 id="phi3-window-partial-rotary-pad-token"),
]


@pytest.mark.parametrize("model_type,overrides,read_back,then", LOSSES)
def test_what_the_reader_loses(tmp_path, model_type, overrides, read_back, then):
    source = make_tiny(model_type, **overrides)
    path = write_gguf(source, tokenizer(), tmp_path / f"{model_type}.gguf")
    config = load_config(path)
    for field, value in read_back.items():
        assert getattr(config, field) == value, field
    if model_type == "phi3" and "partial_rotary_factor" in overrides:
        assert config.rope_parameters["partial_rotary_factor"] == 1.0
    if then != "loads":
        with pytest.raises(Exception, match=then):
            load_model(path, config=config)
        return
    # it loads, as another model than the file's: same weights, other logits
    loaded = load_model(path, config=config)
    with torch.inference_mode():
        assert (logits(loaded) - source(IDS).logits).abs().max() > 1e-2


def test_a_gguf_named_mistral_is_refused(tmp_path):
    """The reader makes a llama-architecture file a mistral only when general.name is exactly
    "mistral" (`"mistral" in [name]`), and then asks gguf-py for an architecture "mistral", which
    gguf 0.19 does not have (mistral3, mistral4 only): such a file cannot load. A file named after
    the model, as llama.cpp names them, loads as a llama (test_gguf_loads_as_the_same_model)."""
    path = write_gguf(make_tiny("mistral"), tokenizer(), tmp_path / "mistral.gguf", name="mistral")
    assert load_config(path).model_type == "mistral"
    with pytest.raises(ModelLoadError, match="Unknown gguf model_type: mistral"):
        load_model(path)
