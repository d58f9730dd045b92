"""Activation quantization (the A8 of W8A8) as pure tensor functions.

Two types, compressed-tensors' conventions, symmetric:

    int8:  s = absmax / 127.5      q = clamp(round(x / s), -128, 127)
    fp8:   s = absmax / 448        q = float8_e4m3fn(clamp(x / s, -448, 448))
           (E4M3 without infinities: 448 is its largest finite value; the cast
           rounds to the nearest representable value, ties to even)

    dequantize: x' = q * s

Scales are per token (dynamic: each row of x [tokens, features] gets its own,
computed at run time) or one per tensor (static: calibrated once, then fixed;
values beyond it saturate, and `saturated_fraction` says how many did). A row
or tensor of zeros gets s = float32 eps, so it quantizes to exact zeros. NaN or
Inf in x raise: they would poison a scale silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

FP8_E4M3_MAX = 448.0
INT8_HALF_RANGE = 127.5  # (qmax - qmin) / 2, as the weights' symmetric convention


def fp8_saturate(x: torch.Tensor) -> torch.Tensor:
    """x in float8_e4m3fn without a scale: rounded to nearest even, saturating at +-448 (an FP8 KV
    cache's entries). The clamp is explicit: torch's CUDA cast gives NaN from 480 on (2.11)."""
    return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


@dataclass(frozen=True)
class ActSpec:
    """How a linear's input is quantized: int8 or fp8 (E4M3), per-token dynamic or per-tensor static."""

    type: Literal["int8", "fp8"] = "int8"
    dynamic: bool = True
    # static scales only: "minmax" takes the largest |x| calibration met; "mse" the clipping range
    # that minimizes the inputs' squared rounding and clipping error (int8; quantkit.algorithms.inputs)
    observer: Literal["minmax", "mse"] = "minmax"

    def __post_init__(self) -> None:
        if self.type not in ("int8", "fp8"):
            raise ValueError(f"ActSpec.type must be 'int8' or 'fp8', got {self.type!r}")
        if not isinstance(self.dynamic, bool):
            raise ValueError(f"ActSpec.dynamic must be a bool, got {self.dynamic!r}")
        if self.observer not in ("minmax", "mse"):
            raise ValueError(f"ActSpec.observer must be 'minmax' or 'mse', got {self.observer!r}")
        if self.observer == "mse" and (self.dynamic or self.type != "int8"):
            raise ValueError("observer 'mse' chooses static int8 input scales: it needs dynamic: false and int8 "
                             "activations (a dynamic scale is each token's own max; fp8 keeps minmax)")

    @property
    def half_range(self) -> float:
        return FP8_E4M3_MAX if self.type == "fp8" else INT8_HALF_RANGE


def _check_finite(x: torch.Tensor) -> None:
    if x.numel() and not torch.isfinite(x.abs().amax()):
        raise ValueError(f"activation {tuple(x.shape)} has {int(torch.isnan(x).sum())} NaN and "
                         f"{int(torch.isinf(x).sum())} Inf values")


def check_input_scale(spec: ActSpec, input_scale: torch.Tensor | None) -> None:
    """A static scheme takes one calibrated input scale (per tensor), a dynamic one none: ValueError otherwise."""
    if spec.dynamic != (input_scale is None):
        raise ValueError("a static activation scheme needs input_scale; a dynamic (per-token) one takes no input_scale")
    if input_scale is not None and input_scale.numel() != 1:
        raise ValueError(f"input_scale must hold one value (per tensor), got shape {tuple(input_scale.shape)}")


def scale_for(absmax: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """float32 scale(s) from absolute maxima (any shape)."""
    s = absmax.to(torch.float32) / spec.half_range
    return s.clamp_min(torch.finfo(torch.float32).eps)


def dynamic_scales(x: torch.Tensor, spec: ActSpec, check: bool = True) -> torch.Tensor:
    """Per-token scales [..., 1] of x [..., features]. check=False skips the NaN / Inf
    test (a device sync on a GPU): a token holding one then gets a NaN or Inf scale,
    which carries into its output row rather than rounding to garbage."""
    if check:
        _check_finite(x)
    return scale_for(x.abs().amax(dim=-1, keepdim=True), spec)


def quantize(x: torch.Tensor, scale: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """x / scale on spec's grid: int8 or float8_e4m3fn values (scale broadcasts against x)."""
    y = x.to(torch.float32) / scale
    if spec.type == "fp8":
        return y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return torch.round(y).clamp_(-128, 127).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale).to(dtype)


def fake_quantize(x: torch.Tensor, spec: ActSpec, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize and dequantize x in its dtype: per token when spec.dynamic, else with
    the calibrated per-tensor `static_scale` (required then)."""
    if spec.dynamic:
        scale = dynamic_scales(x, spec)
    else:
        if static_scale is None:
            raise ValueError("a static activation scheme needs its calibrated scale")
        _check_finite(x)
        scale = static_scale.to(device=x.device, dtype=torch.float32)
    return dequantize(quantize(x, scale, spec), scale, x.dtype)


def saturated_fraction(x: torch.Tensor, scale: torch.Tensor, spec: ActSpec) -> float:
    """Share of x's values beyond the representable range of `scale` (clamped, not rounded)."""
    limit = scale.to(torch.float32) * (FP8_E4M3_MAX if spec.type == "fp8" else 127.0)
    return float((x.to(torch.float32).abs() > limit).float().mean()) if x.numel() else 0.0
