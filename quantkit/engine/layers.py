"""What the runner must know about one model beyond Llama's layer, resolved once from the family
table and the config, and the ops of the pieces the other families add to that layer.

The table (quantkit.models.families.Family) names the modules: the norm feeding attention and the
one feeding the MLP, the norms on the attention / MLP outputs (Gemma), the per-head q/k norms
(Qwen3, Gemma 3), the linears the engine fuses and those the model already packs (Phi-3), the
norms' (offset + w), whether the rotary module takes the layer type (Gemma 3). The config chooses
the rest, read through the table's functions (families.layer_facts: each layer's sliding window,
attention scale and soft-capping; final_logit_softcap; mlp_activation). Nothing here branches on
the model class.

The block these describe (families.py's docstring):

    h = x + attn_out_norm?(self_attn(attn_norm(x)))        q / k through qk_norm per head before RoPE
    y = h + mlp_out_norm?(mlp(mlp_norm(h)))

The runner (quantkit.engine.runner) computes it with the residual add folded into the next norm
(add_rms_norm); Llama's ops are called there, the others' here.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.engine.fusion import fuse
from quantkit.engine.moe import MoEParts, moe_parts
from quantkit.errors import UnsupportedModelError
from quantkit.kernels import engine_ops as ops
from quantkit.models.families import SLIDING, Family, final_logit_softcap, layer_facts, mlp_activation, part_widths

QKV, GATE_UP = "self_attn.qkv_proj", "mlp.gate_up_proj"  # the runner's names for the one-linear q/k/v and gate/up
_PARTS = {QKV: ("q", "k", "v"), GATE_UP: ("gate", "up")}

# The MLP activations with a fused gate * up op besides Llama's SiLU (which the runner calls itself);
# any other activation runs the model's own MLP module.
_ACTIVATIONS = {"gelu_pytorch_tanh": ops.gelu_tanh_mul}


def activation_op(name: str):
    """The op computing act(gate) * up for transformers' ACT2FN `name` ("silu" is the runner's
    own), None when there is none: the runner then calls the model's MLP module."""
    return _ACTIVATIONS.get(name)


def norm_eps(norm: nn.Module) -> float:
    """A transformers RMSNorm's epsilon: Llama's and Qwen's call it variance_epsilon, Gemma's eps."""
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


def _declares(config, field: str) -> bool:
    """Whether the config's class has `field` (a dataclass field in transformers 5, an __init__
    argument before): an attribute set on an instance by hand is not one its model reads."""
    cls = type(config)
    if dataclasses.is_dataclass(cls):
        return field in {f.name for f in dataclasses.fields(cls)}
    return field in inspect.signature(cls.__init__).parameters


@dataclass(frozen=True)
class ModelFacts:
    """Per model (tuples: per decoder layer)."""

    offset: float  # every RMSNorm multiplies by (offset + w): Gemma 1.0
    activation: str  # transformers' ACT2FN name of the MLP's gate nonlinearity
    scales: tuple[float, ...]  # the q.k scale
    windows: tuple[int | None, ...]  # a query sees keys at distance < window; None: every earlier key
    softcaps: tuple[float | None, ...]  # attention scores -> softcap * tanh(scores / softcap)
    rotary_keys: tuple[str | None, ...]  # the layer type the rotary module takes (Gemma 3); None: one for all
    final_softcap: float | None  # logits -> cap * tanh(logits / cap)
    # a sliding_window the config class does not declare, set on a config by hand (say a Llama's):
    # transformers' cache crops to it while the model's attention does not slide, which the engine
    # does not reproduce, so the engine refuses contexts longer than it (Engine)
    undeclared_window: int | None

    @property
    def kv_window(self) -> int | None:
        """The window when every layer slides (Mistral-style sliding_window), None otherwise: then a
        position older than it is read by no layer, and its KV block can be freed. Where global
        layers are interleaved (Gemma 2 / 3) they read every position, so every block stays."""
        if self.windows and all(w is not None for w in self.windows):
            return max(self.windows)
        return None


def model_facts(model: nn.Module, family: Family) -> ModelFacts:
    config = model.config
    facts = layer_facts(config)
    declared = _declares(config, "sliding_window")
    window = getattr(config, "sliding_window", None)
    windows = tuple(f.sliding_window if declared and f.layer_type == SLIDING else None for f in facts)
    return ModelFacts(
        offset=float(family.norm_offset),
        activation=mlp_activation(config, family),
        scales=tuple(f.scale for f in facts),
        windows=windows,
        softcaps=tuple(f.softcap for f in facts),
        rotary_keys=tuple(f.layer_type if family.rotary_per_layer_type else None for f in facts),
        final_softcap=final_logit_softcap(config),
        undeclared_window=int(window) if window is not None and not declared else None,
    )


def rope_context_limit(config) -> tuple[int, str] | None:
    """(positions, rope type) when the config's RoPE changes its frequencies past a length: "dynamic"
    past max_position_embeddings, "longrope" past the original context (its long factors). transformers
    then recomputes them from the longest position of each forward, a batch-wide choice the engine's
    batches (sequences of different lengths together) cannot reproduce; below the limit the
    frequencies are fixed. None: no such limit."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    sets = [v for v in rope.values() if isinstance(v, dict)] or [rope]  # Gemma 3: one set per layer type
    limits = []
    for params in sets:
        kind = params.get("rope_type") or params.get("type")
        if kind == "dynamic":
            limits.append((int(config.max_position_embeddings), kind))
        elif kind == "longrope":
            original = params.get("original_max_position_embeddings") or getattr(
                config, "original_max_position_embeddings", None) or config.max_position_embeddings
            limits.append((int(original), kind))
    return min(limits) if limits else None


@dataclass
class BlockParts:
    """One decoder block's modules as the runner calls them. qkv / gate_up: (module, output widths
    of its parts) when one linear computes q/k/v or gate/up (fused by the engine, or packed in the
    model as Phi-3's), else None and the separate linears run."""

    block: nn.Module
    attn_norm: nn.Module
    mlp_norm: nn.Module
    attn_out_norm: nn.Module | None
    mlp_out_norm: nn.Module | None
    qk_norm: tuple[nn.Module, nn.Module] | None
    qkv: tuple[nn.Module, list[int]] | None
    gate_up: tuple[nn.Module, list[int]] | None
    moe: MoEParts | None = None  # a sparse layer's router and experts (quantkit.engine.moe), in place of the MLP


def block_parts(block: nn.Module, family: Family, config) -> BlockParts:
    """The block's modules; fuses the table's `fused` linears (quantkit.engine.fusion) where they can be.
    `family`: the block's own table (families.block_family: a sparse layer's has no dense MLP)."""
    one: dict[str, tuple[nn.Module, list[int]]] = {}
    for name, part_names in family.fused:
        parts = [block.get_submodule(n) for n in part_names]
        module = fuse(parts)
        if module is not None:
            one[name] = (module, [p.out_features for p in parts])
    for packed in family.packed:
        if _PARTS.get(packed.linear) != packed.parts:
            raise UnsupportedModelError(f"the engine splits {', '.join(_PARTS)} into {list(_PARTS.values())}; "
                                        f"{family.name}'s packed {packed.linear} holds {packed.parts}")
        one[packed.linear] = (block.get_submodule(packed.linear), part_widths(packed, config))
    get = block.get_submodule
    return BlockParts(
        block=block,
        attn_norm=get(family.attn_norm),
        mlp_norm=get(family.mlp_norm),
        attn_out_norm=get(family.attn_out_norm) if family.attn_out_norm else None,
        mlp_out_norm=get(family.mlp_out_norm) if family.mlp_out_norm else None,
        qk_norm=(get(family.qk_norm[0]), get(family.qk_norm[1])) if family.qk_norm else None,
        qkv=one.get(QKV),
        gate_up=one.get(GATE_UP),
        moe=moe_parts(block, family),
    )


# ---- the ops of the pieces beyond Llama's layer ---------------------------------------------------
def qk_norm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, norms: tuple[nn.Module, nn.Module],
            offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, Hq * D], k / v [T, Hk * D] -> (q, k) normalized per head, v; views of one tensor."""
    q_norm, k_norm = norms
    return ops.qk_rms_norm(q, k, v, q_norm.weight, k_norm.weight, norm_eps(q_norm), offset)


def out_norm(x: torch.Tensor, norm: nn.Module, offset: float) -> torch.Tensor:
    """RMSNorm of an attention or MLP output before its residual add (Gemma's post norms)."""
    return ops.add_rms_norm(x, None, norm.weight, norm_eps(norm), offset)[0]


def cap_logits(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return ops.softcap(logits, cap)
