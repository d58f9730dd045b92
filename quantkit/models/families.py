"""Architecture facts as data: one table per model family.

The driver, the algorithms (AWQ / SmoothQuant mappings), the checkpoint reader
and the engine all read these tables; nothing else in quantkit branches on the
model class.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantkit.errors import UnsupportedModelError


@dataclass(frozen=True)
class Mapping:
    """A previous op whose output feeds `linears`; AWQ and SmoothQuant fold
    per-input-channel scales into `prev` (a norm weight or a linear's rows)."""

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values this table describes
    blocks: str  # dotted path of the ModuleList of decoder blocks
    embed: str
    final_norm: str
    lm_head: str
    rotary: str | None  # shared rotary embedding module, when the model has one
    # linears of one block, relative to the block, in execution order
    linears: tuple[str, ...]
    # linears that see the same input, so one observation serves all of them
    shared_inputs: tuple[tuple[str, ...], ...]
    mappings: tuple[Mapping, ...]
    # sub-modules whose output the driver may compute once and replay
    # (quantkit.replay), each with the prefixes of the linears its output
    # depends on: once those are rounded, its output is final
    replay_modules: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # (module, linear): the module's (first) output is exactly that linear applied
    # to its input, so once the rest of the module is final the driver can record
    # the linear's input and rebuild the module's output after rounding it,
    # instead of running the module again (for attention: the attention itself)
    replay_tails: tuple[tuple[str, str], ...] = ()
    # linears whose outputs form attention scores (through a softmax): searches
    # that minimize a linear's own output error (AWQ's clipping) leave them be
    score_linears: tuple[str, ...] = ()
    # vLLM fuses these; they must share one quantization scheme there
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()


LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    rotary="model.rotary_emb",
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    shared_inputs=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    mappings=(
        Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Mapping("self_attn.v_proj", ("self_attn.o_proj",)),
        Mapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        Mapping("mlp.up_proj", ("mlp.down_proj",)),
    ),
    replay_modules=(
        ("input_layernorm", ()),  # depends on the block's input only
        ("self_attn", ("self_attn.",)),
        ("post_attention_layernorm", ("self_attn.",)),
        ("mlp", ("self_attn.", "mlp.")),
    ),
    replay_tails=(("self_attn", "self_attn.o_proj"),),
    score_linears=("self_attn.q_proj", "self_attn.k_proj"),
    fused=(
        ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
    ),
)

FAMILIES: dict[str, Family] = {LLAMA.name: LLAMA}


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES.values() for t in f.model_types)


def family_for(config) -> Family:
    """The family table for a transformers config (or anything with `model_type`)."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    archs = getattr(config, "architectures", None) or []
    raise UnsupportedModelError(
        f"unsupported architecture: model_type={model_type!r}"
        + (f" ({', '.join(archs)})" if archs else "")
        + f"; supported model types: {', '.join(supported_model_types())}"
    )
