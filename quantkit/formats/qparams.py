"""Scales, zero points and round-to-nearest quantization for `IntSpec` formats.

The conventions equal compressed-tensors' defaults, so numbers compare with
llm-compressor's. With R = qmax - qmin (15 for 4 bits) and a group's min m and
max M, first widened so that m <= 0 <= M (0.0 must be representable):

    symmetric:   s = max(|m|, |M|) / (R / 2)          z = 0
                 (4 bits: s = absmax / 7.5, so +absmax rounds to 8 and clamps to 7)
    asymmetric:  s = (M - m) / R                      z = clamp(round(qmin - m / s), qmin, qmax)

    quantize:    q = clamp(round(w / s + z), qmin, qmax)      (round half to even)
    dequantize:  w' = (q - z) * s                             (both: quantkit.formats.grouped)

An all-zero group would give s = 0; it gets s = finfo(dtype).eps instead, so q = z
there and w' = 0 exactly. Arithmetic runs in float32 (or wider) whatever the
weight dtype; s is returned in the weight's dtype (or IntSpec.scale_dtype), z is computed from that stored
s, and `quantize` divides by s as stored, so quantize -> save -> load -> dequantize
is reproducible bit for bit.

z is added before rounding, as compressed-tensors does; round(w/s) + z would
differ only on exact .5 ties with an odd z. For float32 weights every result here
equals compressed-tensors' bit for bit; for bf16/fp16 weights it does w / s in
float32 where compressed-tensors stays in the weight dtype, so a value lying on a
rounding boundary can land one step apart. Re-quantizing a dequantized weight
with the same (s, z) gives the same q, except for bf16 at 8 bits asymmetric, where
|q - z| reaches 255 and rounding (q - z) * s to bf16 can move it half a step.
"""

from __future__ import annotations

import torch

from quantkit.formats.fp8 import quantize_fp8
from quantkit.formats.grouped import check_finite, compute_dtype, dequantize, quantize
from quantkit.formats.spec import FloatSpec, IntSpec
from quantkit.formats.weight import QuantizedWeight

# quantize and dequantize live in formats.grouped (below the QuantizedWeight record); named here too
__all__ = ["compute_qparams", "default_g_idx", "dequantize", "fake_quantize", "group_minmax", "quantize", "quantize_rtn",
           "stored_scale_dtype"]


def default_g_idx(
    in_features: int, group_size: int | None, device: torch.device | str | None = None
) -> torch.Tensor:
    """int32 [in_features]: column j belongs to group j // group_size (0 when per-channel)."""
    if group_size is None:
        return torch.zeros(in_features, dtype=torch.int32, device=device)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or None, got {group_size}")
    return torch.arange(in_features, dtype=torch.int32, device=device) // group_size


def group_minmax(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each (row, column-group) of w.

    w [out, in] -> (mins, maxs), each [out, ceil(in / group_size)] in w's dtype
    ([out, 1] when group_size is None). The last group may hold fewer than
    group_size columns; its min/max cover only its own columns.
    """
    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    check_finite(w, "weight")
    out, n_in = w.shape
    if group_size is None or group_size >= n_in:
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or None, got {group_size}")
    n_full = n_in // group_size
    full = w[:, : n_full * group_size].reshape(out, n_full, group_size)  # [out, n_full, gs]
    mins, maxs = [full.amin(dim=2)], [full.amax(dim=2)]
    if n_in % group_size:
        tail = w[:, n_full * group_size :]  # [out, in % gs]
        mins.append(tail.amin(dim=1, keepdim=True))
        maxs.append(tail.amax(dim=1, keepdim=True))
    return torch.cat(mins, dim=1), torch.cat(maxs, dim=1)


def stored_scale_dtype(spec: IntSpec | FloatSpec, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a weight of `weight_dtype` stores its scales in under `spec`."""
    name = getattr(spec, "scale_dtype", None)
    return weight_dtype if name is None else getattr(torch, name)


def compute_qparams(
    w_min: torch.Tensor, w_max: torch.Tensor, spec: IntSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) from group mins/maxs; see the module docstring for the math.

    w_min, w_max [out, n_groups] float -> scale [out, n_groups] in spec.scale_dtype (None: w_min's dtype),
    zero_point [out, n_groups] int8 (all zeros when spec.symmetric).
    """
    if w_min.shape != w_max.shape:
        raise ValueError(f"w_min {tuple(w_min.shape)} and w_max {tuple(w_max.shape)} differ in shape")
    if not w_min.is_floating_point():
        raise ValueError(f"w_min/w_max must be float, got {w_min.dtype}")
    check_finite(w_min, "w_min")
    check_finite(w_max, "w_max")
    out_dtype = stored_scale_dtype(spec, w_min.dtype)
    cdt = compute_dtype(out_dtype)
    m = w_min.to(cdt).clamp(max=0)
    M = w_max.to(cdt).clamp(min=0)
    q_range = spec.qmax - spec.qmin  # R = 2**bits - 1

    if spec.symmetric:
        scale = torch.maximum(m.abs(), M).div(q_range / 2)
    else:
        scale = (M - m).div(q_range)
    # Store first, then guard: a tiny fp16 scale can also underflow to 0 on the cast.
    scale = scale.to(out_dtype)
    scale = scale.masked_fill(scale == 0, torch.finfo(out_dtype).eps)

    if spec.symmetric:
        zero_point = torch.zeros(scale.shape, dtype=torch.int8, device=scale.device)
    else:
        # z from the stored scale, so that m itself maps to (about) qmin
        z = torch.round(spec.qmin - m / scale.to(cdt)).clamp(spec.qmin, spec.qmax)
        zero_point = z.to(torch.int8)
    return scale, zero_point


def quantize_rtn(w: torch.Tensor, spec: IntSpec | FloatSpec) -> QuantizedWeight:
    """Round-to-nearest: qparams from each group's min/max, then `quantize`.

    w [out, in] float -> QuantizedWeight (scale in w's dtype or spec.scale_dtype, g_idx None).
    A FloatSpec rounds to FP8 (quantkit.formats.fp8).
    """
    if isinstance(spec, FloatSpec):
        check_finite(w, "weight")
        return quantize_fp8(w, spec)
    w_min, w_max = group_minmax(w, spec.group_size)  # [out, n_groups] each
    scale, zero_point = compute_qparams(w_min, w_max, spec)
    q = quantize(w, scale, zero_point, spec)
    return QuantizedWeight(q=q, scale=scale, zero_point=zero_point, spec=spec)


def fake_quantize(w: torch.Tensor, spec: IntSpec | FloatSpec) -> torch.Tensor:
    """dequantize(quantize_rtn(w, spec)), in w's dtype and shape [out, in]."""
    return quantize_rtn(w, spec).dequantize(w.dtype)
