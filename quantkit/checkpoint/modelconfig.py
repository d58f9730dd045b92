"""The model fields of a checkpoint's config.json, checked before transformers sees them.

transformers validates its configs too, but some values it accepts (an
unknown activation, a padding id beyond the vocabulary, an odd head size)
fail later, while the model is built or run, with an error that does not name
the file. Each check here names the field and the value found.
"""

from __future__ import annotations

import torch

from quantkit.checkpoint.config import field, show, string_list, typed
from quantkit.errors import CheckpointError

REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
NULLABLE_SIZES = ("num_key_value_heads", "head_dim", "sliding_window")  # null: derived or unused
SIZES = ("max_position_embeddings", "pretraining_tp")  # may be left out, not null
BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_cache", "use_sliding_window")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
MAX_SIZE = 2**31 - 1  # per dimension: the product of two still fits torch's int64 sizes


def _positive_int(value: object, path: str) -> int:
    typed(value, "integer", path)
    if value <= 0:
        raise CheckpointError(f"{path}: expected a positive integer, got {show(value)}")
    if value > MAX_SIZE:
        raise CheckpointError(f"{path}: {value} is beyond any model (at most {MAX_SIZE})")
    return value


def _positive_number(value: object, path: str) -> float:
    typed(value, "number", path)
    if value <= 0:
        raise CheckpointError(f"{path}: expected a positive number, got {show(value)}")
    return value


def _rope(raw: dict) -> None:
    if "rope_theta" in raw and raw["rope_theta"] is not None:
        _positive_number(raw["rope_theta"], "rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        params = field(raw, key, "object", "")
        if not params:
            continue
        for sub in ("rope_type", "type"):
            field(params, sub, "string", key)
        for sub in ("rope_theta", "factor"):
            if params.get(sub) is not None:
                _positive_number(params[sub], f"{key}.{sub}")


def _token_ids(raw: dict, vocab: int) -> None:
    for key in TOKEN_IDS:
        value = raw.get(key)
        if isinstance(value, list) and key == "eos_token_id":  # several end tokens
            for i, v in enumerate(value):
                typed(v, "integer", f"{key}[{i}]")
        else:
            typed(value, "integer", key, nullable=True)
    pad = raw.get("pad_token_id")
    if pad is not None and not -vocab <= pad < vocab:  # nn.Embedding asserts this
        raise CheckpointError(f"pad_token_id: {pad} is outside the vocabulary of {vocab} tokens")


def check_model_config(raw: dict, where: str) -> None:
    """The fields a causal LM of the supported families needs, each checked; CheckpointError naming
    `where` and the field otherwise."""
    from transformers.activations import ACT2FN

    try:
        size = {key: _positive_int(field(raw, key, "integer", "", required=True), key) for key in REQUIRED}
        for key in NULLABLE_SIZES + SIZES:  # transformers refuses null for the latter: so do we, first
            if key == "sliding_window" and raw.get(key) == 0 and raw.get("use_sliding_window") is False:
                continue  # Qwen2-MoE writes 0 for "no window"
            if raw.get(key) is not None or (key in raw and key in SIZES):
                size[key] = _positive_int(raw[key], key)
        if "max_window_layers" in raw and typed(raw["max_window_layers"], "integer", "max_window_layers") < 0:
            raise CheckpointError(f"max_window_layers: expected an integer >= 0, got {raw['max_window_layers']}")
        for key in BOOLS:
            if key in raw:
                typed(raw[key], "bool", key)
        if "hidden_act" in raw and typed(raw["hidden_act"], "string", "hidden_act") not in ACT2FN:
            raise CheckpointError(f"hidden_act: unknown activation {raw['hidden_act']!r}; known: {', '.join(sorted(ACT2FN))}")
        if "rms_norm_eps" in raw:
            _positive_number(raw["rms_norm_eps"], "rms_norm_eps")
        for key in ("attention_dropout", "initializer_range"):
            if key in raw and typed(raw[key], "number", key) < 0:
                raise CheckpointError(f"{key}: expected a number >= 0, got {show(raw[key])}")
        for key in ("dtype", "torch_dtype"):
            name = field(raw, key, "string", "")
            if name is not None and name != "auto" and not isinstance(getattr(torch, name, None), torch.dtype):
                raise CheckpointError(f"{key}: {name!r} is not a torch dtype")
        string_list(raw.get("architectures"), "architectures")
        layer_types = string_list(raw.get("layer_types"), "layer_types")
        if layer_types and len(layer_types) != size["num_hidden_layers"]:
            raise CheckpointError(f"layer_types: {len(layer_types)} entries for {size['num_hidden_layers']} layers")
        _rope(raw)
        _token_ids(raw, size["vocab_size"])
        heads = size["num_attention_heads"]
        kv = size.get("num_key_value_heads", heads)
        if heads % kv:
            raise CheckpointError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        if "head_dim" not in size and size["hidden_size"] % heads:
            raise CheckpointError(f"hidden_size {size['hidden_size']} is not a multiple of num_attention_heads {heads} "
                                  f"(and there is no head_dim)")
        head_dim = size.get("head_dim", size["hidden_size"] // heads)
        if head_dim % 2:  # rotary embeddings rotate pairs of features
            raise CheckpointError(f"the head size {head_dim} is odd; rotary embeddings need an even head size")
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
