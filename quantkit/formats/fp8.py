"""FP8 (E4M3) weights: one scale per output channel or per tensor, symmetric.

    s = max |w| / 448        over the row (channel) or the whole weight (tensor)
    q = float8_e4m3fn(clamp(w / s, -448, 448))   (round to nearest, ties to even)
    w ~= q * s

The scale is stored in the weight's dtype, and q is computed from the stored
scale, so what is written is exactly what dequantizes. An all-zero row (or
weight) gets the smallest positive scale and quantizes to exact zeros.
"""

from __future__ import annotations

import torch

from quantkit.formats.activation import FP8_E4M3_MAX
from quantkit.formats.spec import FloatSpec
from quantkit.formats.weight import QuantizedWeight


def fp8_scale(w: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    """The stored scale: [out, 1] (channel) or [1, 1] (tensor), in w's dtype."""
    a = w.detach().abs().to(torch.float32)
    absmax = a.amax(dim=1, keepdim=True) if spec.strategy == "channel" else a.amax().reshape(1, 1)
    if not torch.isfinite(absmax).all():
        raise ValueError(f"weight {tuple(w.shape)} has NaN or Inf values")
    tiny = torch.finfo(w.dtype if w.dtype.is_floating_point else torch.float32).tiny
    return (absmax / FP8_E4M3_MAX).to(w.dtype).clamp_min(tiny)


def quantize_fp8(w: torch.Tensor, spec: FloatSpec, scale: torch.Tensor | None = None) -> QuantizedWeight:
    """w [out, in] -> QuantizedWeight with float8_e4m3fn q (scale from w unless given)."""
    if scale is None:
        scale = fp8_scale(w, spec)
    y = w.to(torch.float32) / scale.to(torch.float32)
    q = y.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight(q=q, scale=scale, zero_point=torch.zeros(scale.shape, dtype=torch.int8, device=w.device), spec=spec)
