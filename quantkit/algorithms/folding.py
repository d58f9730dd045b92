"""Folding a transform's scales into a block, so the float block computes the same function.

For linears W_i fed by one input x and per-channel scales s,

    W_i x = (W_i diag(s)) (diag(s)^-1 x)

so the linears' columns are multiplied by s and the op that produced x (a norm's
weight, or the rows of a previous linear; the model family's mapping table says
which) is divided by it: a norm computing (1 + w) (Gemma) gets w' = (1 + w) / s - 1,
a packed linear (Phi-3's gate_up_proj) only the rows of the part that feeds x.
Modules that read x too but are not quantized (a mixture of experts' router and
shared-expert gate: the mapping's `compensate`) get their columns multiplied by
s like the linears, so their outputs, and the routing, stay the float model's.
AWQ and SmoothQuant only choose s; this module applies it, for every mapping of
the family, then lets the transforms clip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantkit.algorithms.base import Rounder, Transform, WeightSpec
from quantkit.models import Family, Mapping
from quantkit.models.families import head_dim, part_rows


@dataclass
class Target:
    """A linear of a block that the recipe quantizes."""

    rel: str  # name inside the block, e.g. "self_attn.q_proj"
    name: str  # full module name
    linear: torch.nn.Linear
    spec: WeightSpec


def fold_into_previous(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor, offset: float = 0.0) -> None:
    """Divide the op before by s, in place: a norm's weight [in] elementwise, a
    linear's weight [in, k] row by row; its bias [in] likewise.

    A norm that multiplies by (offset + w) (Gemma's RMSNorm: 1 + w) must compute
    (offset + w) / s afterwards, so w' = (offset + w) / s - offset."""
    s = s.to(weight.device)
    inv = (1.0 / s).to(torch.float32)
    if weight.ndim == 1 and offset:
        weight.copy_(((weight.to(torch.float32) + offset) * inv - offset).to(weight.dtype))
    elif weight.ndim == 1:
        weight.copy_((weight.to(torch.float32) * inv).to(weight.dtype))
    else:
        weight.copy_((weight.to(torch.float32) * inv[:, None]).to(weight.dtype))
    if bias is not None:
        bias.copy_((bias.to(torch.float32) * inv).to(bias.dtype))


def scale_columns(weight: torch.Tensor, s: torch.Tensor) -> None:
    """Multiply a linear's input columns by s, in place (weight [out, in])."""
    weight.copy_((weight.to(torch.float32) * s.to(weight.device)[None, :]).to(weight.dtype))


def apply_transforms(block: torch.nn.Module, targets: list[Target], family: Family, transforms: list[Transform],
                     rounder: Rounder | None, step: Callable[[str], None] = lambda what: None, config=None) -> None:
    """Each transform in turn: scale every family mapping it can fold, then clip the
    linears (not those whose outputs form attention scores). A mapping that cannot
    apply is reported with the reason, never silently dropped. rounder: the
    rounding's trial round (it compensates errors, so transforms confirm by it).
    step(what) is called after each mapping and after the clipping. config: the
    model's config, for mappings into a part of a packed linear (its rows)."""
    by_rel = {t.rel: t for t in targets}
    for transform in transforms:
        for mapping in family.mappings:
            _scale_mapping(block, mapping, by_rel, transform, rounder, family, config)
            step(f"{transform.name} {mapping.prev} -> {', '.join(rel.rsplit('.', 1)[-1] for rel in mapping.linears)}")
        for t in targets:
            if t.rel not in family.score_linears:
                t.linear.weight.data.copy_(transform.clip(t.name, t.linear.weight.data, t.spec, rounder))
        step(f"{transform.name} clipping")


@dataclass
class _Previous:
    """The op before a mapping's linears, as far as folding needs it."""

    weight: torch.Tensor  # a norm's [in], or the rows of a linear [in, k] that feed the mapping
    bias: torch.Tensor | None
    offset: float = 0.0  # a norm computing (offset + w)
    # grouped-query attention, v -> o: the linears' input channel c is row tied[c] of the op before
    # (query head h reads value head h // (heads / kv_heads)); None: one row per channel
    tied: torch.Tensor | None = None


def grouped_heads(config, width: int, rows: int) -> torch.Tensor | None:
    """Under grouped-query attention, o_proj's input channel c = h * head_dim + d holds query head h's
    share of value head h // (heads / kv_heads), dimension d: [width] those value rows, or None when
    `width` and `rows` are not a GQA model's o_proj input and v_proj output."""
    if config is None:
        return None
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = head_dim(config)
    if width != heads * hd or rows != kv * hd or kv >= heads or heads % kv:
        return None
    c = torch.arange(width)
    return (c // hd) // (heads // kv) * hd + c % hd


def _previous_op(block: torch.nn.Module, mapping: Mapping, width: int, family: Family, config) -> _Previous | str:
    """The op before a mapping's linears, or why its output cannot be scaled."""
    prev = block.get_submodule(mapping.prev)
    if isinstance(prev, torch.nn.Linear):
        weight, bias = prev.weight.data, None if prev.bias is None else prev.bias.data
        what = mapping.prev
        if mapping.prev_part is not None:  # only this part's rows feed the mapping's linears
            if config is None:
                raise ValueError(f"folding into {mapping.prev}'s {mapping.prev_part} rows needs the model config")
            start, end = part_rows(family, mapping.prev, mapping.prev_part, config)
            weight, bias = weight[start:end], None if bias is None else bias[start:end]
            what = f"{mapping.prev_part} of {mapping.prev}"
        if weight.shape[0] != width:
            tied = grouped_heads(config, width, weight.shape[0])
            if tied is None:
                return f"{what} has {weight.shape[0]} outputs, its linears take {width} inputs (grouped-query attention)"
            return _Previous(weight, bias, tied=tied)
        return _Previous(weight, bias)
    weight, bias = getattr(prev, "weight", None), getattr(prev, "bias", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (width,):
        return f"{mapping.prev} ({type(prev).__name__}) has no per-channel weight of width {width}"
    return _Previous(weight.data, None if bias is None else bias.data, family.norm_offset)


def _scale_mapping(block: torch.nn.Module, mapping: Mapping, by_rel: dict[str, Target], transform: Transform,
                   rounder: Rounder | None, family: Family, config) -> None:
    members = [by_rel[rel] for rel in mapping.linears if rel in by_rel]
    names = [m.name for m in members]
    missing = [rel for rel in mapping.linears if rel not in by_rel]
    if missing:
        transform.skipped(names, f"{', '.join(missing)} not quantized")
        return
    if mapping.reason is not None:  # structural: never foldable in this family
        transform.skipped(names, mapping.reason)
        return
    prev = _previous_op(block, mapping, members[0].linear.in_features, family, config)
    if isinstance(prev, str):
        transform.skipped(names, prev)
        return
    if prev.tied is not None and not transform.ties_channels:
        transform.skipped(names, f"{mapping.prev} has {prev.weight.shape[0]} outputs, its linears take "
                                 f"{len(prev.tied)} inputs (grouped-query attention: {transform.name} does not "
                                 f"tie the query heads' scales)")
        return
    weights = [m.linear.weight.data for m in members]
    if prev.tied is None:
        found = transform.propose_scales(names, weights, [m.spec for m in members], rounder)
    else:
        found = transform.propose_scales(names, weights, [m.spec for m in members], rounder, tied=prev.tied)
    if found.alpha is None:
        return  # the unscaled weights rounded best: nothing to fold
    s_prev = found.scales
    if prev.tied is not None:  # one scale per row of the op before
        tied = prev.tied.to(found.scales.device)
        s_prev = torch.ones(prev.weight.shape[0], dtype=found.scales.dtype, device=found.scales.device)
        s_prev[tied] = found.scales
        if not torch.equal(s_prev[tied], found.scales):
            raise RuntimeError(f"{transform.name} proposed different scales for channels that share a value head")
    fold_into_previous(prev.weight, prev.bias, s_prev, prev.offset)
    for m in members:
        scale_columns(m.linear.weight.data, found.scales)
    for rel in mapping.compensate:  # float readers of the same input (an MoE router): outputs unchanged
        scale_columns(block.get_submodule(rel).weight.data, found.scales)
    transform.folded(names, found.scales)
