"""Folding a transform's scales into a block, so the float block computes the same function.

For linears W_i fed by one input x and per-channel scales s,

    W_i x = (W_i diag(s)) (diag(s)^-1 x)

so the linears' columns are multiplied by s and the op that produced x (a norm's
weight, or the rows of a previous linear; the model family's mapping table says
which) is divided by it. AWQ and SmoothQuant only choose s; this module applies
it, for every mapping of the family, then lets the transforms clip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantkit.algorithms.base import Rounder, Transform, WeightSpec
from quantkit.models import Family, Mapping


@dataclass
class Target:
    """A linear of a block that the recipe quantizes."""

    rel: str  # name inside the block, e.g. "self_attn.q_proj"
    name: str  # full module name
    linear: torch.nn.Linear
    spec: WeightSpec


def fold_into_previous(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor) -> None:
    """Divide the op before by s, in place: a norm's weight [in] elementwise, a
    linear's weight [in, k] row by row; its bias [in] likewise."""
    s = s.to(weight.device)
    inv = (1.0 / s).to(torch.float32)
    if weight.ndim == 1:
        weight.copy_((weight.to(torch.float32) * inv).to(weight.dtype))
    else:
        weight.copy_((weight.to(torch.float32) * inv[:, None]).to(weight.dtype))
    if bias is not None:
        bias.copy_((bias.to(torch.float32) * inv).to(bias.dtype))


def scale_columns(weight: torch.Tensor, s: torch.Tensor) -> None:
    """Multiply a linear's input columns by s, in place (weight [out, in])."""
    weight.copy_((weight.to(torch.float32) * s.to(weight.device)[None, :]).to(weight.dtype))


def apply_transforms(block: torch.nn.Module, targets: list[Target], family: Family, transforms: list[Transform],
                     rounder: Rounder | None, step: Callable[[str], None] = lambda what: None) -> None:
    """Each transform in turn: scale every family mapping it can fold, then clip the
    linears (not those whose outputs form attention scores). A mapping that cannot
    apply is reported with the reason, never silently dropped. rounder: the
    rounding's trial round (it compensates errors, so transforms confirm by it).
    step(what) is called after each mapping and after the clipping."""
    by_rel = {t.rel: t for t in targets}
    for transform in transforms:
        for mapping in family.mappings:
            _scale_mapping(block, mapping, by_rel, transform, rounder)
            step(f"{transform.name} {mapping.prev} -> {', '.join(rel.rsplit('.', 1)[-1] for rel in mapping.linears)}")
        for t in targets:
            if t.rel not in family.score_linears:
                t.linear.weight.data.copy_(transform.clip(t.name, t.linear.weight.data, t.spec, rounder))
        step(f"{transform.name} clipping")


def _previous_op(block: torch.nn.Module, mapping: Mapping, width: int) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    """(weight, bias) of the op before a mapping's linears, or why its output cannot be scaled."""
    prev = block.get_submodule(mapping.prev)
    if isinstance(prev, torch.nn.Linear):
        if prev.out_features != width:
            return f"{mapping.prev} has {prev.out_features} outputs, its linears take {width} inputs (grouped-query attention)"
        return prev.weight.data, None if prev.bias is None else prev.bias.data
    weight, bias = getattr(prev, "weight", None), getattr(prev, "bias", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (width,):
        return f"{mapping.prev} ({type(prev).__name__}) has no per-channel weight of width {width}"
    return weight.data, None if bias is None else bias.data


def _scale_mapping(block: torch.nn.Module, mapping: Mapping, by_rel: dict[str, Target], transform: Transform,
                   rounder: Rounder | None) -> None:
    members = [by_rel[rel] for rel in mapping.linears if rel in by_rel]
    names = [m.name for m in members]
    missing = [rel for rel in mapping.linears if rel not in by_rel]
    if missing:
        transform.skipped(names, f"{', '.join(missing)} not quantized")
        return
    prev = _previous_op(block, mapping, members[0].linear.in_features)
    if isinstance(prev, str):
        transform.skipped(names, prev)
        return
    found = transform.propose_scales(names, [m.linear.weight.data for m in members], [m.spec for m in members], rounder)
    if found.alpha is None:
        return  # the unscaled weights rounded best: nothing to fold
    fold_into_previous(*prev, found.scales)
    for m in members:
        scale_columns(m.linear.weight.data, found.scales)
    transform.folded(names, found.scales)
