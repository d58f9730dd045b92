"""Fake quantization of grouped weights: round to a spec and back, in one broadcast.

What the searches of the transforms (AWQ's scales and clips, SmoothQuant's
migration strength) score their candidates with: the dequantized weight that
round-to-nearest makes of W under `spec`, with the group ranges taken from W
or given.
"""

from __future__ import annotations

import torch

from quantkit.formats.qparams import compute_qparams, dequantize, fake_quantize, group_minmax, quantize
from quantkit.formats.spec import FloatSpec, IntSpec


def fake_quantize_grouped(W: torch.Tensor, spec: IntSpec | FloatSpec, w_min: torch.Tensor | None = None,
                          w_max: torch.Tensor | None = None) -> torch.Tensor:
    """Round W [out, in] to `spec` and back; group ranges from W unless given ([out, n_groups]).
    A FloatSpec (FP8) rounds on its row or tensor absmax scale (ranges not taken)."""
    if isinstance(spec, FloatSpec):
        return fake_quantize(W, spec)
    if w_min is None or w_max is None:
        w_min, w_max = group_minmax(W, spec.group_size)
    scale, zp = compute_qparams(w_min, w_max, spec)
    out_f, in_f = W.shape
    gs = spec.group_size or in_f
    if W.dtype == torch.float32 and scale.dtype == torch.float32 and in_f % gs == 0:
        return round_trip(W.reshape(out_f, in_f // gs, gs), scale, zp, spec).reshape(out_f, in_f)
    return dequantize(quantize(W, scale, zp, spec), scale, zp, spec, dtype=W.dtype)


def round_trip(Wg: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    """Whole groups Wg [out, G, gs] (float32) quantized and dequantized with per-group
    scale / zero point [out, G]: formats.quantize/dequantize's arithmetic, one broadcast, no checks."""
    s3, z3 = scale[..., None], zp.to(torch.float32)[..., None]
    return (torch.round(Wg / s3 + z3).clamp_(spec.qmin, spec.qmax) - z3) * s3
