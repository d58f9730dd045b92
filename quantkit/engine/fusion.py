"""Linears that read the same input, run as one (the family table's `fused` entries: q/k/v,
gate/up). One wide matrix reads its weight in one pass and launches once; at decode batch sizes
that is what the step costs. The parts keep working: their weights become views of the fused
one, so the transformers model still runs and no weight is stored twice.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.formats import per_tensor
from quantkit.nn.quant_linear import IntWeightLinear, W8A8Linear


def fuse(parts: list[nn.Module]) -> nn.Module | None:
    """A module computing torch.cat([p(x) for p in parts], -1), or None where they cannot be fused
    (different kinds, formats or inputs, act-order with different orders, per-tensor W8A8 weight scales,
    unsupported types)."""
    if all(type(p) is nn.Linear for p in parts):
        return _fuse_float(parts)
    if all(type(p) is IntWeightLinear for p in parts):
        return _fuse_int(parts)
    if all(type(p) is W8A8Linear for p in parts):
        return _fuse_w8a8(parts)
    return None


def _views(whole: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(whole.split(sizes, dim=0))


def _fuse_float(parts: list[nn.Linear]) -> nn.Linear | None:
    first = parts[0]
    if any(p.in_features != first.in_features or p.weight.dtype != first.weight.dtype for p in parts):
        return None
    sizes = [p.out_features for p in parts]
    fused = nn.Linear(first.in_features, sum(sizes), bias=any(p.bias is not None for p in parts),
                      device="meta").requires_grad_(False)
    fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features)
                                             for p in parts]), requires_grad=False)
    for p, w in zip(parts, _views(fused.weight.data, sizes)):
        p.weight = nn.Parameter(w, requires_grad=False)
    if fused.bias is not None:
        for p, b in zip(parts, _views(fused.bias.data, sizes)):
            if p.bias is not None:
                p.bias = nn.Parameter(b, requires_grad=False)
    return fused


def _fuse_int(parts: list[IntWeightLinear]) -> IntWeightLinear | None:
    first = parts[0]
    spec, per_word = first.spec, 32 // first.spec.bits
    same = all(p.spec == spec and p.in_features == first.in_features and p.weight_scale.dtype == first.weight_scale.dtype
               for p in parts)
    g_idx = [p.weight_g_idx for p in parts]
    if not same or any((g is None) != (g_idx[0] is None) for g in g_idx):
        return None
    if g_idx[0] is not None and any(not torch.equal(g, g_idx[0]) for g in g_idx):
        return None  # act-order with different column orders: one kernel cannot take both
    if not spec.symmetric and any(p.out_features % per_word for p in parts):
        return None  # zero points are packed along the rows: parts must end on a word
    sizes = [p.out_features for p in parts]
    fused = IntWeightLinear(first.in_features, sum(sizes), spec, bias=any(p.bias is not None for p in parts),
                            dtype=first.weight_scale.dtype, has_g_idx=g_idx[0] is not None,
                            device=first.weight_packed.device)
    fused.weight_packed = torch.cat([p.weight_packed for p in parts])
    fused.weight_scale = torch.cat([p.weight_scale for p in parts])
    if not spec.symmetric:
        fused.weight_zero_point = torch.cat([p.weight_zero_point for p in parts])
    if g_idx[0] is not None:
        fused.weight_g_idx = g_idx[0].clone()
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias if p.bias is not None else p.weight_scale.new_zeros(p.out_features)
                                             for p in parts]), requires_grad=False)
    for p, w, sc in zip(parts, _views(fused.weight_packed, sizes), _views(fused.weight_scale, sizes)):
        p.weight_packed, p.weight_scale, p._prepared = w, sc, None
    if not spec.symmetric:
        for p, z in zip(parts, _views(fused.weight_zero_point, [n // per_word for n in sizes])):
            p.weight_zero_point = z
    return fused


def _fuse_w8a8(parts: list[W8A8Linear]) -> W8A8Linear | None:
    """Per-channel (or grouped) weight scales are rows: they concatenate. A per-tensor one is the
    whole part's, which one fused scale cannot hold for every part; static input scales must agree
    (calibration gives linears that read one input one scale)."""
    first = parts[0]
    same = all(p.spec == first.spec and p.act == first.act and p.in_features == first.in_features
               and p.weight_scale.dtype == first.weight_scale.dtype for p in parts)
    if not same or per_tensor(first.spec):
        return None
    if not first.act.dynamic and any(not torch.equal(p.input_scale, first.input_scale) for p in parts):
        return None
    sizes = [p.out_features for p in parts]
    fused = W8A8Linear(first.in_features, sum(sizes), first.spec, first.act,
                       bias=any(p.bias is not None for p in parts), dtype=first.weight_scale.dtype,
                       device=first.weight.device)
    fused.weight = torch.cat([p.weight for p in parts])
    fused.weight_scale = torch.cat([p.weight_scale for p in parts])
    if not first.act.dynamic:
        fused.input_scale = first.input_scale.clone()
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias if p.bias is not None else p.weight_scale.new_zeros(p.out_features)
                                             for p in parts]), requires_grad=False)
    for p, w, sc in zip(parts, _views(fused.weight, sizes), _views(fused.weight_scale, sizes)):
        p.weight, p.weight_scale, p._prepared = w, sc, None
    return fused
