"""Architecture facts as data: one table per model family.

The driver, the algorithms (AWQ / SmoothQuant mappings), the checkpoint reader
and the engine all read these tables; nothing else in quantkit branches on the
model class.

Two kinds of facts, kept apart:
  the table (Family)   what the architecture IS, the same for every checkpoint of
                       the family: module names, which norm feeds which linears,
                       the block's order of norms and residual adds, which
                       linears are packed (Phi-3's qkv_proj), which mappings can
                       never fold and why, the RMSNorm's (offset + w).
  the config           what one checkpoint CHOOSES: widths and head counts, each
                       layer's attention type (sliding window or global,
                       config.layer_types), the window, the soft-capping values,
                       the attention scale, the rotary bases (Gemma 3: one per
                       layer type), the activation. Read through the functions at
                       the end of this file (layer_types, layer_facts,
                       final_logit_softcap, part_widths, ...), never by
                       branching on the model class.

One block of every family here computes (names are the table's fields):

    h = x + attn_out_norm?(self_attn(attn_norm(x)))           q/k through qk_norm per head before RoPE
    y = h + mlp_out_norm?(mlp(mlp_norm(h)))

with RMSNorm(x) = x / rms(x) * (norm_offset + w) for every norm of the model
(the final norm and qk norms included), and the embeddings multiplied by
sqrt(hidden_size) when embed_scale is set (the embedding module does it).

In a mixture of experts (Family.moe: Mixtral, Qwen2-MoE, Qwen3-MoE) `mlp` is a
sparse MLP in the layers sparse_layers names: a float router, per-expert
linears, maybe a shared expert. The table of such a layer, one set of entries
per expert (their count from the config), is block_family's; the driver, the
folding and the engine read each layer's table from it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from quantkit.errors import UnsupportedModelError


@dataclass(frozen=True)
class Mapping:
    """A previous op whose output feeds `linears`; AWQ and SmoothQuant fold
    per-input-channel scales into `prev` (a norm weight or a linear's rows).

    prev_part: `prev` is a packed linear (Family.packed): only the rows of this
    part feed `linears` (Phi-3: the "up" rows of gate_up_proj feed down_proj).
    reason: why the mapping can never fold for this family; it is reported as
    skipped with this reason and never tried. (A mapping that cannot fold for
    one checkpoint only, v -> o under grouped-query attention, is found at run
    time from the shapes and reported the same way.)
    compensate: modules that read the same input as `linears` but are not
    quantized (an MoE router, the shared expert's gate): their weight's columns
    are multiplied by the same s, so their outputs stay the float model's
    (the router's logits, hence the routing, up to float rounding).
    """

    prev: str
    linears: tuple[str, ...]
    prev_part: str | None = None
    reason: str | None = None
    compensate: tuple[str, ...] = ()


@dataclass(frozen=True)
class Packed:
    """A linear of the model that holds several projections stacked along its
    output rows, in `parts` order: ("q", "k", "v") or ("gate", "up"). The part
    widths come from the config (part_widths)."""

    linear: str  # relative to the block, e.g. "self_attn.qkv_proj"
    parts: tuple[str, ...]


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
    # vLLM fuses these separate linears into one; they must share one
    # quantization scheme there (the engine fuses them too)
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # linears that already are fused in the model, and how to split their outputs
    packed: tuple[Packed, ...] = ()
    # every RMSNorm of the model multiplies by (norm_offset + w): Gemma 1.0
    norm_offset: float = 0.0
    # the norm whose output feeds attention, and the one whose output feeds the MLP
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    # norms applied to the attention / MLP OUTPUT before the residual add (Gemma), or None
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    # per-head RMSNorms on q and k (over head_dim), applied before RoPE (Qwen3, Gemma 3)
    qk_norm: tuple[str, str] | None = None
    # the embedding module multiplies its output by sqrt(hidden_size), in the weight's dtype
    embed_scale: bool = False
    # the rotary module's forward takes the layer type (x, position_ids, layer_type):
    # Gemma 3's sliding layers have their own rotary base
    rotary_per_layer_type: bool = False
    # config attribute naming the MLP activation (gate's nonlinearity)
    activation_key: str = "hidden_act"
    # the sparse MLP of a mixture-of-experts family (its sparse layers: sparse_layers)
    moe: MoE | None = None


@dataclass(frozen=True)
class MoE:
    """The sparse MLP of a mixture-of-experts family, at `mlp`:

        y = sum over the router's top-k experts e of  w_e * down_e(act(gate_e(x)) * up_e(x))
            + sigmoid(shared_expert_gate(x)) * shared_expert(x)          (Qwen2-MoE only)

    transformers 5 stores a layer's experts fused: experts.gate_up_proj [E, 2I, H] (gate rows, then
    up rows) and experts.down_proj [E, H, I]. quantkit.models.moe replaces that module at load by one
    holding each expert's three nn.Linear under the names below, so every pass (observers, GPTQ, AWQ,
    the writer, the reader, the engine) sees ordinary linears; a checkpoint names them per expert,
    as transformers' save_pretrained writes them. The router and the shared expert's gate stay in 16
    bits; the shared expert is a dense MLP (gate_proj / up_proj / down_proj). The per-layer table
    (block_family) is derived from these facts and the config's expert count.
    """

    num_experts_key: str  # config attribute: the number of routed experts
    expert_linears: tuple[str, str, str]  # names of (gate, up, down) inside each expert
    width_key: str  # config attribute: an expert's intermediate width
    experts: str = "mlp.experts"  # the experts module (fused in transformers, per-expert in quantkit)
    router: str = "mlp.gate"  # a weight [E, hidden]: logits -> softmax -> top-k
    shared_expert: str | None = None
    shared_expert_gate: str | None = None  # a Linear [1, hidden]
    # (module-name part, checkpoint-name part) where transformers' save_pretrained writes
    # another name than its module's (Mixtral: the MLP module is `mlp`, its tensors block_sparse_moe.*)
    renames: tuple[tuple[str, str], ...] = ()


_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_SHARED = (_QKV, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_FUSED = (("self_attn.qkv_proj", _QKV), ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")))
_QK_NORM = ("self_attn.q_norm", "self_attn.k_norm")

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    rotary="model.rotary_emb",
    linears=_ATTENTION + _MLP,
    shared_inputs=_SHARED,
    mappings=(
        Mapping("input_layernorm", _QKV),
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
    fused=_FUSED,
)

# Llama's block with per-head RMSNorms on q and k. They sit after q_proj / k_proj,
# so scaling those linears' input columns (input_layernorm -> q/k/v) leaves them be.
QWEN3 = replace(LLAMA, name="qwen3", model_types=("qwen3",), qk_norm=_QK_NORM)

_GEMMA_MAPPINGS = (
    Mapping("input_layernorm", _QKV),
    Mapping("self_attn.v_proj", ("self_attn.o_proj",)),
    # the MLP's input is pre_feedforward_layernorm's output; post_attention_layernorm
    # normalizes the attention output before the residual add
    Mapping("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Mapping("mlp.up_proj", ("mlp.down_proj",)),
)

# Gemma 2: RMSNorm with (1 + w), a norm after attention and after the MLP (before
# each residual add), scaled embeddings, gelu-tanh MLP; sliding-window layers
# interleaved with global ones and logit soft-capping (both from the config).
GEMMA2 = Family(
    name="gemma2",
    model_types=("gemma2",),
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    rotary="model.rotary_emb",
    linears=_ATTENTION + _MLP,
    shared_inputs=_SHARED,
    mappings=_GEMMA_MAPPINGS,
    replay_modules=(
        ("input_layernorm", ()),
        ("self_attn", ("self_attn.",)),
        ("post_attention_layernorm", ("self_attn.",)),  # on the attention output
        ("pre_feedforward_layernorm", ("self_attn.",)),
        ("mlp", ("self_attn.", "mlp.")),
        ("post_feedforward_layernorm", ("self_attn.", "mlp.")),  # on the MLP output
    ),
    replay_tails=(("self_attn", "self_attn.o_proj"),),
    score_linears=("self_attn.q_proj", "self_attn.k_proj"),
    fused=_FUSED,
    norm_offset=1.0,
    mlp_norm="pre_feedforward_layernorm",
    attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
    embed_scale=True,
    activation_key="hidden_activation",
)

# Gemma 3 (text): Gemma 2's block with per-head q/k norms ((1 + w) too), and the
# sliding layers' own rotary base (config.rope_parameters per layer type).
# model_type "gemma3" is the multimodal model (Gemma3ForConditionalGeneration): see REFUSED.
GEMMA3 = replace(GEMMA2, name="gemma3", model_types=("gemma3_text",), qk_norm=_QK_NORM, rotary_per_layer_type=True)

# Phi-3: Llama's block with q/k/v in one linear and gate/up in another (the model's
# own modules, written under these names in checkpoints).
PHI3 = Family(
    name="phi3",
    model_types=("phi3",),
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    rotary="model.rotary_emb",
    linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    shared_inputs=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    mappings=(
        Mapping("input_layernorm", ("self_attn.qkv_proj",)),
        # v's rows of qkv_proj; under grouped-query attention the widths differ (found at run time)
        Mapping("self_attn.qkv_proj", ("self_attn.o_proj",), prev_part="v"),
        Mapping("post_attention_layernorm", ("mlp.gate_up_proj",)),
        Mapping("mlp.gate_up_proj", ("mlp.down_proj",), prev_part="up"),
    ),
    replay_modules=(
        ("input_layernorm", ()),
        ("self_attn", ("self_attn.",)),
        ("post_attention_layernorm", ("self_attn.",)),
        ("mlp", ("self_attn.", "mlp.")),
    ),
    replay_tails=(("self_attn", "self_attn.o_proj"),),
    # q and k share qkv_proj with v: the whole linear is left unclipped
    score_linears=("self_attn.qkv_proj",),
    packed=(Packed("self_attn.qkv_proj", ("q", "k", "v")), Packed("mlp.gate_up_proj", ("gate", "up"))),
)

# Mixture-of-experts families: Llama's (Qwen3's) attention, a sparse MLP in place of the dense one
# (the per-layer tables: block_family). Mixtral's experts are w1 (gate), w3 (up), w2 (down) and its
# checkpoints name the MLP block_sparse_moe.
MIXTRAL = replace(LLAMA, name="mixtral", model_types=("mixtral",), moe=MoE(
    num_experts_key="num_local_experts", expert_linears=("w1", "w3", "w2"), width_key="intermediate_size",
    renames=((".mlp.", ".block_sparse_moe."),)))
# Qwen2-MoE: routed experts plus a shared expert every token goes through, scaled by
# sigmoid(shared_expert_gate(x)); layers in config.mlp_only_layers (or off decoder_sparse_step)
# keep Llama's dense MLP (config.intermediate_size wide).
QWEN2_MOE = replace(LLAMA, name="qwen2_moe", model_types=("qwen2_moe",), moe=MoE(
    num_experts_key="num_experts", expert_linears=("gate_proj", "up_proj", "down_proj"),
    width_key="moe_intermediate_size", shared_expert="mlp.shared_expert", shared_expert_gate="mlp.shared_expert_gate"))
# Qwen3-MoE: Qwen3's attention (q/k norms), routed experts, no shared expert; dense layers as Qwen2-MoE's.
QWEN3_MOE = replace(QWEN3, name="qwen3_moe", model_types=("qwen3_moe",), moe=MoE(
    num_experts_key="num_experts", expert_linears=("gate_proj", "up_proj", "down_proj"),
    width_key="moe_intermediate_size"))

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, QWEN3, GEMMA2, GEMMA3, PHI3, MIXTRAL, QWEN2_MOE, QWEN3_MOE)}

# model types that look supported but are not, with the reason shown to the user
REFUSED: dict[str, str] = {
    "gemma3": "the multimodal Gemma 3 (Gemma3ForConditionalGeneration, a vision tower beside the language "
              "model); quantkit reads the text-only model_type gemma3_text (Gemma3ForCausalLM)",
}


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES.values() for t in f.model_types)


def family_for(config) -> Family:
    """The family table for a transformers config (or anything with `model_type`)."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    archs = getattr(config, "architectures", None) or []
    why = f": {REFUSED[model_type]}" if model_type in REFUSED else ""
    raise UnsupportedModelError(
        f"unsupported architecture: model_type={model_type!r}"
        + (f" ({', '.join(archs)})" if archs else "") + why
        + f"; supported model types: {', '.join(supported_model_types())}"
    )


# --------------------------------------------------------------------------- facts from the config

FULL, SLIDING = "full_attention", "sliding_attention"


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def part_widths(packed: Packed, config) -> list[int]:
    """Output rows of each part of a packed linear, in order."""
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    widths = {"q": config.num_attention_heads * head_dim(config), "k": kv * head_dim(config),
              "v": kv * head_dim(config), "gate": config.intermediate_size, "up": config.intermediate_size}
    return [widths[p] for p in packed.parts]


def part_rows(family: Family, linear: str, part: str, config) -> tuple[int, int]:
    """[start, end) of `part`'s rows in the packed `linear`."""
    packed = next(p for p in family.packed if p.linear == linear)
    widths = part_widths(packed, config)
    i = packed.parts.index(part)
    return sum(widths[:i]), sum(widths[: i + 1])


def layer_types(config) -> list[str]:
    """Each decoder layer's attention type, FULL or SLIDING (config.layer_types;
    a config without it has one type for every layer)."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types[: config.num_hidden_layers])
    return [SLIDING if getattr(config, "sliding_window", None) else FULL] * config.num_hidden_layers


@dataclass(frozen=True)
class LayerFacts:
    """What one decoder layer's attention does, as the config says."""

    layer_type: str  # FULL or SLIDING
    sliding_window: int | None  # a query sees the keys at distance < this; None: every earlier key
    scale: float  # the q.k scale (Gemma: query_pre_attn_scalar ** -0.5, else head_dim ** -0.5)
    softcap: float | None  # scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2)
    rope_theta: float | None  # this layer's rotary base, when the config names one
    partial_rotary_factor: float  # fraction of head_dim that is rotated (Phi-3 variants: < 1)


def layer_facts(config) -> list[LayerFacts]:
    """Per decoder layer, what its attention does (from the config)."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    scale = (scalar if scalar else head_dim(config)) ** -0.5
    softcap = getattr(config, "attn_logit_softcapping", None)
    rope = getattr(config, "rope_parameters", None) or {}
    out = []
    for t in layer_types(config):
        params = rope[t] if isinstance(rope.get(t), dict) else rope  # Gemma 3: one set per layer type
        window = getattr(config, "sliding_window", None) if t == SLIDING else None
        out.append(LayerFacts(t, window, scale, softcap, params.get("rope_theta"),
                              float(params.get("partial_rotary_factor", 1.0) or 1.0)))
    return out


def attention_implementation(config) -> str | None:
    """The attention implementation transformers must run for this checkpoint, None for its
    default. Soft-capped attention scores (Gemma 2) need "eager": torch's fused attention has no
    capping, and transformers before 5.18 ran Gemma 2 through it anyway, silently uncapped."""
    return "eager" if getattr(config, "attn_logit_softcapping", None) else None


def final_logit_softcap(config) -> float | None:
    """logits -> cap * tanh(logits / cap) after the output head (Gemma 2 / 3), or None."""
    return getattr(config, "final_logit_softcapping", None) or None


def mlp_activation(config, family: Family) -> str:
    """The MLP activation's name in transformers' ACT2FN ("silu", "gelu_pytorch_tanh")."""
    return getattr(config, family.activation_key, None) or "silu"


# --------------------------------------------------------------------------- mixture of experts

def num_experts(config, family: Family) -> int:
    """The routed experts of each sparse layer (0 for a dense family)."""
    return int(getattr(config, family.moe.num_experts_key, 0) or 0) if family.moe is not None else 0


def sparse_layers(config, family: Family) -> list[bool]:
    """Which decoder layers hold the family's sparse MLP, as transformers builds them: every layer
    but those in config.mlp_only_layers and those off config.decoder_sparse_step (Qwen-MoE; a
    config without them, Mixtral's, has every layer sparse)."""
    n = config.num_hidden_layers
    if family.moe is None or num_experts(config, family) == 0:
        return [False] * n
    dense = set(getattr(config, "mlp_only_layers", None) or ())
    step = getattr(config, "decoder_sparse_step", None) or 1
    return [i not in dense and (i + 1) % step == 0 for i in range(n)]


def block_family(family: Family, config, layer: int) -> Family:
    """The table of decoder layer `layer`: the family's own, or in a sparse layer the family's with
    every entry under `mlp` replaced by the sparse MLP's, one set per expert (sparse_family)."""
    if not sparse_layers(config, family)[layer]:
        return family
    return sparse_family(family, num_experts(config, family))


def _under_mlp(rel: str) -> bool:
    return rel == "mlp" or rel.startswith("mlp.")


@functools.cache
def sparse_family(family: Family, experts: int) -> Family:
    """The table of a sparse layer with `experts` routed experts, in execution order: the shared
    expert (Qwen2-MoE computes it first), then each expert's (gate, up) and (down).

    Mappings: the norm feeding the MLP folds into every expert's and the shared expert's gate / up
    at once (one scale must suit them all: their input is the same normed x), and the router and the
    shared expert's gate, which read that x too and stay float, get their columns multiplied by the
    same s: their outputs, hence the routing, stay the float model's. Each expert's up -> down folds
    on its own. Replay: each expert (and the shared expert) is a module whose output is final once
    its three linears are, so true-sequential stages replay the experts before instead of recomputing."""
    moe = family.moe
    per_expert = [tuple(f"{moe.experts}.{e}.{n}" for n in moe.expert_linears) for e in range(experts)]
    mlps = ([tuple(f"{moe.shared_expert}.{n}" for n in ("gate_proj", "up_proj", "down_proj"))]
            if moe.shared_expert else []) + per_expert
    compensate = (moe.router,) + ((moe.shared_expert_gate,) if moe.shared_expert_gate else ())
    modules = ([moe.shared_expert] if moe.shared_expert else []) + [f"{moe.experts}.{e}" for e in range(experts)]
    return replace(
        family,
        linears=tuple(rel for rel in family.linears if not _under_mlp(rel)) + tuple(rel for m in mlps for rel in m),
        shared_inputs=tuple(g for g in family.shared_inputs if not any(map(_under_mlp, g)))
        + tuple(g for gate, up, down in mlps for g in ((gate, up), (down,))),
        mappings=tuple(m for m in family.mappings if not any(map(_under_mlp, m.linears)))
        + (Mapping(family.mlp_norm, tuple(rel for m in mlps for rel in m[:2]), compensate=compensate),)
        + tuple(Mapping(up, (down,)) for _, up, down in mlps),
        replay_modules=family.replay_modules + tuple((m, (f"{m}.",)) for m in modules),
        fused=tuple(f for f in family.fused if not _under_mlp(f[0])),
    )


def checkpoint_name(family: Family, name: str) -> str:
    """The name transformers' save_pretrained gives a module's tensor (Mixtral: mlp -> block_sparse_moe)."""
    for module_part, file_part in family.moe.renames if family.moe is not None else ():
        name = name.replace(module_part, file_part)
    return name


def module_name(family: Family, key: str) -> str:
    """checkpoint_name's inverse: the module name of a checkpoint's tensor name."""
    for module_part, file_part in family.moe.renames if family.moe is not None else ():
        key = key.replace(file_part, module_part)
    return key
