"""What the engine's FP8 KV cache does to a model's predictions, measured through transformers: the
engine (EngineConfig(kv_cache_dtype="fp8")) stores keys after RoPE and values as float8 E4M3 without
a scale (formats.activation.fp8_saturate) and reads them back exactly, so its attention is the model's
own over those rounded keys and values. use_fp8_kv_cache gives a transformers model that attention,
for `quantkit eval --kv-cache-dtype fp8` (perplexity, KL divergence). The CPU tests check that the
engine with an FP8 cache and the model so changed agree to float rounding."""

from __future__ import annotations

import sys

import torch

from quantkit.formats.activation import fp8_saturate

_WRAPPED: dict[str, str] = {}  # registered attention name -> the implementation it wraps


def _rounded(t: torch.Tensor) -> torch.Tensor:
    return fp8_saturate(t).to(t.dtype)


def use_fp8_kv_cache(model: torch.nn.Module) -> str:
    """Make a transformers model attend over its keys (after RoPE) and values rounded to FP8 E4M3 as
    the engine's FP8 cache stores them, with its current attention implementation (eager, sdpa, ...)
    doing the rest; returns that implementation's name (set_attn_implementation restores it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = model.config._attn_implementation or "eager"
    if current in _WRAPPED:
        return _WRAPPED[current]
    name = f"quantkit_fp8_kv_{current}"
    if current == "eager":  # not in the registry: each model file has its own eager attention
        module_name = type(model).__module__
        inner = getattr(sys.modules[module_name], "eager_attention_forward", None)
        if inner is None:
            raise ValueError(f"{type(model).__name__} has no eager_attention_forward to round the KV cache in; "
                             "load it with attn_implementation='sdpa'")
        name += "_" + module_name.rsplit(".", 1)[-1]  # the registry is global: one name per model file
    else:
        inner = ALL_ATTENTION_FUNCTIONS[current]

    def attention(module, query, key, value, *args, **kwargs):
        return inner(module, query, _rounded(key), _rounded(value), *args, **kwargs)

    AttentionInterface.register(name, attention)
    # the same masks as before (causal, sliding windows, padding): transformers builds none for an
    # attention name it has no mask function for
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    _WRAPPED[name] = current
    model.set_attn_implementation(name)
    return current
