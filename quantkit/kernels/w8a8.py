"""The W8A8 matmul: y = (Q(x) @ Q(W)^T) * s_x * s_w (+ bias), int8 or FP8 on both sides; W4A8 too
(integer weights of fewer bits in int8, one scale per group of inputs).

One entry point, `w8a8_matmul`, over the backends of op "w8a8" in quantkit.kernels.registry,
as for the integer-weight kernel (kernels.int_weight); and `w8a8_matmul_quantized` (op
"w8a8_quantized", the same backends) for an input that arrives quantized: the engine's ops in
front of a W8A8 linear write it so (engine_ops.add_rms_norm_quant, silu_mul_quant):

    reference   torch, any device (here): quantizes x exactly as compressed-tensors
                does (formats.activation), multiplies the integer / FP8 values
                in float32 (int8 products and FP8 products are exact there) and
                applies both scales. The twin every faster backend is tested against.
    torch       CUDA only (quantkit.kernels.w8a8_torch): torch._int_mm (int8 x int8 -> int32)
                and torch._scaled_mm (FP8 x FP8 with row-wise scales) on the tensor
                cores: the baselines the CUDA kernels of csrc/ have to beat.
                Dynamic inputs are quantized by csrc/quantize_rows.cu (one
                kernel) where CuPy is installed, else by torch ops.

Weights: q int8 or float8_e4m3fn [N, K] with one scale per output row (or one
for the tensor), or, W4A8, q int8 [N, K] holding 2..8-bit values with one scale
per (row, group of `group_size` inputs); inputs: per-token scales computed at
run time (dynamic), or the calibrated per-tensor `input_scale` (static; larger
values saturate).

Grouped weights: the reference dequantizes W' = q * s_w (float32, per group)
at each call and computes y = (Q(x) @ W'^T) * s_x, the product transformers +
compressed-tensors compute (the weight decompressed, the input fake-quantized).
The torch backend's _int_mm has one scale per output row and takes no groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantkit.formats.activation import ActSpec, check_input_scale, dynamic_scales, quantize
from quantkit.formats.grouped import dequantize
from quantkit.formats.spec import FloatSpec, IntSpec
from quantkit.kernels import registry
from quantkit.kernels.registry import register_backend


@dataclass
class PreparedW8A8:
    """One weight in the layout its backend wants.

    tensors for "reference": q [N, K] (int8 | float8_e4m3fn), scale float32 [N, 1]
    ([N, G] for a grouped weight), input_scale float32 [1, 1] (static only). For
    "torch" (never grouped): q_t [K, N] column-major (what _int_mm / _scaled_mm take),
    scale float32 [1, N], input_scale as above.
    """

    backend: str
    weights: IntSpec | FloatSpec
    act: ActSpec
    shape: tuple[int, int]  # (N, K)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def grouped(self) -> bool:
        return self.weights.group_size is not None

    def __str__(self) -> str:  # what a backend refusal names (registry.select_backend)
        groups = f" in groups of {self.weights.group_size}" if self.grouped else ""
        return f"a {self.shape} {self.act.type} weight{groups}"


def input_scales(x2: torch.Tensor, w: PreparedW8A8, check: bool = True) -> torch.Tensor:
    if w.act.dynamic:
        return dynamic_scales(x2, w.act, check)  # [M, 1]; check: raise on NaN / Inf
    return w.tensors["input_scale"]


@register_backend("w8a8", "reference", prepare=lambda w: w)  # the reference layout is the backend's
def w8a8_matmul_reference(x: torch.Tensor, w: PreparedW8A8, bias: torch.Tensor | None) -> torch.Tensor:
    x2 = x.reshape(-1, w.shape[1])
    if not w.act.dynamic and x2.numel() and not torch.isfinite(x2.abs().amax()):
        raise ValueError(f"input {tuple(x.shape)} has NaN or Inf values")
    sx = input_scales(x2, w)
    y = w8a8_matmul_quantized_reference(quantize(x2, sx, w.act), sx, w, bias, x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


@register_backend("w8a8_quantized", "reference")
def w8a8_matmul_quantized_reference(xq: torch.Tensor, sx: torch.Tensor, w: PreparedW8A8, bias: torch.Tensor | None,
                                    dtype: torch.dtype) -> torch.Tensor:
    t = w.tensors
    if w.grouped:  # W' = q * s_w per group, then the float product
        zero = t["scale"].new_zeros(t["scale"].shape, dtype=torch.int8)  # symmetric
        y = (xq.to(torch.float32) @ dequantize(t["q"], t["scale"], zero, w.weights).T) * sx
    else:
        acc = xq.to(torch.float32) @ t["q"].to(torch.float32).T  # exact products, float32 sums
        y = acc * sx * t["scale"].T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(dtype)


def prepare_w8a8(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    weights: IntSpec | FloatSpec,
    act: ActSpec,
    backend: str | None = None,
) -> PreparedW8A8:
    """On-disk compressed-tensors tensors (int-quantized / float-quantized) -> the backend's layout.

    weight:       int8 or float8_e4m3fn [N, K]; int8 holds weights.bits-bit values
    weight_scale: [N, 1] (per channel), [1] / [1, 1] (per tensor) or, weights in groups,
                  [N, ceil(K / group_size)]
    input_scale:  [1] when act is static, else None
    backend:      a name of op "w8a8"; None picks the fastest available on weight's device
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    want = torch.float8_e4m3fn if isinstance(weights, FloatSpec) else torch.int8
    if weight.dtype != want or (act.type == "fp8") != (want == torch.float8_e4m3fn):
        raise ValueError(f"a {act.type} W8A8 layer needs {want} weights, got {weight.dtype}")
    if weights.group_size is not None:
        g = weights.num_groups(k)
        if tuple(weight_scale.shape) != (n, g):
            raise ValueError(f"weight_scale has shape {tuple(weight_scale.shape)}, expected ({n}, {g}) "
                             f"(group size {weights.group_size} on {k} inputs)")
    elif weight_scale.numel() not in (1, n) or (weight_scale.numel() == n and weight_scale.shape[0] != n):
        raise ValueError(f"weight_scale has shape {tuple(weight_scale.shape)}, expected ({n}, 1) or (1,)")
    check_input_scale(act, input_scale)
    scale = weight_scale.to(torch.float32)
    scale = scale.contiguous() if weights.group_size is not None else scale.reshape(-1, 1).expand(n, 1).contiguous()
    tensors = {"q": weight, "scale": scale}
    if input_scale is not None:
        tensors["input_scale"] = input_scale.to(torch.float32).reshape(1, 1)
    prepared = PreparedW8A8("reference", weights, act, (n, k), tensors)
    return registry.select_backend("w8a8", weight.device, spec=prepared, override=backend).prepare(prepared)


def w8a8_matmul(x: torch.Tensor, w: PreparedW8A8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] = Q(x) [..., K] @ Q(W)^T * scales + bias, returned in x's dtype."""
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {w.shape[1]}")
    return registry.backend("w8a8", w.backend).run(x, w, bias)


def w8a8_matmul_quantized(xq: torch.Tensor, sx: torch.Tensor, w: PreparedW8A8, bias: torch.Tensor | None = None,
                          dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """y [M, N] = (xq @ Q(W)^T) * sx * s_w (+ bias) in `dtype`: w8a8_matmul on an input quantized
    already, as w8a8_matmul would have quantized it (engine_ops.add_rms_norm_quant, silu_mul_quant).

    xq     int8 | float8_e4m3fn (w.act.type's) [M, K], contiguous
    sx     float32 [M, 1], contiguous: each row's scale (per token, or the static one repeated)
    bias   [N] or None
    dtype  the output's: the dtype of the activations xq was quantized from
    """
    want = torch.float8_e4m3fn if w.act.type == "fp8" else torch.int8
    if xq.ndim != 2 or xq.shape[1] != w.shape[1] or xq.dtype != want:
        raise ValueError(f"the weight expects a {want} input [M, {w.shape[1]}], got {xq.dtype} {tuple(xq.shape)}")
    if tuple(sx.shape) != (xq.shape[0], 1) or sx.dtype != torch.float32:
        raise ValueError(f"sx must be float32 [{xq.shape[0]}, 1], got {sx.dtype} {tuple(sx.shape)}")
    return registry.backend("w8a8_quantized", w.backend).run(xq, sx, w, bias, dtype)
