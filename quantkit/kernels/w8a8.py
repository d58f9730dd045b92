"""The W8A8 matmul: y = (Q(x) @ Q(W)^T) * s_x * s_w (+ bias), int8 or FP8 on both sides.

One entry point, `w8a8_matmul`, over per-backend implementations, as for the
integer-weight kernel (kernels.int_weight):

    reference   torch, any device: quantizes x exactly as compressed-tensors
                does (formats.activation), multiplies the integer / FP8 values
                in float32 (int8 products and FP8 products are exact there) and
                applies both scales. The twin every faster backend is tested against.
    torch       CUDA only: torch._int_mm (int8 x int8 -> int32) and
                torch._scaled_mm (FP8 x FP8 with row-wise scales) on the tensor
                cores: the baselines the CUDA kernels of csrc/ have to beat.
                Dynamic inputs are quantized by csrc/quantize_rows.cu (one
                kernel) where CuPy is installed, else by torch ops.

Weights: q int8 or float8_e4m3fn [N, K] with one scale per output row (or one
for the tensor); inputs: per-token scales computed at run time (dynamic), or
the calibrated per-tensor `input_scale` (static; larger values saturate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from quantkit.formats.activation import ActSpec, dynamic_scales, quantize
from quantkit.formats.spec import FloatSpec, IntSpec
from quantkit.kernels import cuda
from quantkit.kernels.registry import choose_backend


@dataclass
class PreparedW8A8:
    """One weight in the layout its backend wants.

    tensors for "reference": q [N, K] (int8 | float8_e4m3fn), scale float32 [N, 1],
    input_scale float32 [1, 1] (static only). For "torch": q_t [K, N] column-major
    (what _int_mm / _scaled_mm take), scale float32 [1, N], input_scale as above.
    """

    backend: str
    weights: IntSpec | FloatSpec
    act: ActSpec
    shape: tuple[int, int]  # (N, K)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Backend:
    prepare: Callable[[PreparedW8A8], PreparedW8A8]  # reference layout -> the backend's
    matmul: Callable[[torch.Tensor, PreparedW8A8, torch.Tensor | None], torch.Tensor]
    available: Callable[[torch.device, PreparedW8A8], bool]


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, backend: Backend) -> None:
    BACKENDS[name] = backend


def _input_scales(x2: torch.Tensor, w: PreparedW8A8, check: bool = True) -> torch.Tensor:
    if w.act.dynamic:
        return dynamic_scales(x2, w.act, check)  # [M, 1]; check: raise on NaN / Inf
    return w.tensors["input_scale"]


# ----------------------------------------------------------------- reference

def _matmul_reference(x: torch.Tensor, w: PreparedW8A8, bias: torch.Tensor | None) -> torch.Tensor:
    t = w.tensors
    x2 = x.reshape(-1, w.shape[1])
    if not w.act.dynamic and x2.numel() and not torch.isfinite(x2.abs().amax()):
        raise ValueError(f"input {tuple(x.shape)} has NaN or Inf values")
    sx = _input_scales(x2, w)
    xq = quantize(x2, sx, w.act)
    acc = xq.to(torch.float32) @ t["q"].to(torch.float32).T  # exact products, float32 sums
    y = acc * sx * t["scale"].T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


register_backend("reference", Backend(lambda w: w, _matmul_reference, lambda device, w: True))


# ----------------------------------------------------------------- torch (CUDA tensor cores)

def _prepare_torch(w: PreparedW8A8) -> PreparedW8A8:
    t = w.tensors
    tensors = {"q_t": t["q"].T, "scale": t["scale"].reshape(1, -1).contiguous()}  # q row-major: q.T is column-major
    if "input_scale" in t:
        tensors["input_scale"] = t["input_scale"]
    return PreparedW8A8("torch", w.weights, w.act, w.shape, tensors)


def _torch_available(device: torch.device, w: PreparedW8A8) -> bool:
    if device.type != "cuda":
        return False
    n, k = w.shape
    if w.act.type == "int8":
        return k % 8 == 0 and n % 8 == 0
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) >= (8, 9) and k % 16 == 0 and n % 16 == 0


def _matmul_torch(x: torch.Tensor, w: PreparedW8A8, bias: torch.Tensor | None) -> torch.Tensor:
    t = w.tensors
    n, k = w.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if w.act.dynamic and cuda.available() and x2.dtype in _SUFFIX:  # one fused kernel instead of ~8 torch ops
        xq, sx = quantize_rows_cuda(x2 if x2.stride(1) == 1 else x2.contiguous(), w.act)
    else:
        sx = _input_scales(x2, w, check=False)  # no device sync: a NaN token gets a NaN output row
        xq = quantize(x2, sx, w.act)
    if w.act.type == "int8":
        if m <= 16:  # _int_mm takes more than 16 rows: pad with zero rows
            xq = torch.cat([xq, xq.new_zeros(17 - m, k)])
        acc = torch._int_mm(xq, t["q_t"])[:m]
        if cuda.available() and x.dtype in _SUFFIX:  # one pass over the output instead of four
            y = scale_epilogue_cuda(acc, sx.expand(m, 1), t["scale"], bias, x.dtype)
        else:
            y = acc.to(torch.float32) * sx * t["scale"]
            if bias is not None:
                y = y + bias.to(torch.float32)
            y = y.to(x.dtype)
    else:
        sa = sx.expand(m, 1).contiguous() if sx.numel() == 1 else sx
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        y = torch._scaled_mm(xq, t["q_t"], scale_a=sa.to(torch.float32), scale_b=t["scale"], out_dtype=out_dtype)
        if bias is not None:
            y = y + bias.to(out_dtype)
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


register_backend("torch", Backend(_prepare_torch, _matmul_torch, _torch_available))


# ----------------------------------------------------------------- entry points

def select_backend(device: torch.device | str, w: PreparedW8A8, override: str | None = None) -> str:
    """The fastest backend that takes `w` on `device`, or `override` when given."""
    device = torch.device(device)
    return choose_backend(BACKENDS, ("cuda", "torch"), lambda b: b.available(device, w), override, "W8A8 kernel",
                          f"W8A8 kernel backend {override!r} does not take a {w.shape} {w.act.type} weight on {device}")


def prepare_w8a8(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    weights: IntSpec | FloatSpec,
    act: ActSpec,
    backend: str | None = None,
) -> PreparedW8A8:
    """On-disk compressed-tensors tensors (int-quantized / float-quantized) -> the backend's layout.

    weight:       int8 or float8_e4m3fn [N, K]
    weight_scale: [N, 1] (per channel) or [1] / [1, 1] (per tensor)
    input_scale:  [1] when act is static, else None
    backend:      None picks the fastest available on weight's device
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    want = torch.float8_e4m3fn if isinstance(weights, FloatSpec) else torch.int8
    if weight.dtype != want or (act.type == "fp8") != (want == torch.float8_e4m3fn):
        raise ValueError(f"a {act.type} W8A8 layer needs {want} weights, got {weight.dtype}")
    if weight_scale.numel() not in (1, n) or (weight_scale.numel() == n and weight_scale.shape[0] != n):
        raise ValueError(f"weight_scale has shape {tuple(weight_scale.shape)}, expected ({n}, 1) or (1,)")
    if act.dynamic != (input_scale is None):
        raise ValueError("a static activation scheme needs input_scale; a dynamic one takes none")
    if input_scale is not None and input_scale.numel() != 1:
        raise ValueError(f"input_scale must hold one value (per tensor), got shape {tuple(input_scale.shape)}")
    tensors = {"q": weight, "scale": weight_scale.to(torch.float32).reshape(-1, 1).expand(n, 1).contiguous()}
    if input_scale is not None:
        tensors["input_scale"] = input_scale.to(torch.float32).reshape(1, 1)
    prepared = PreparedW8A8("reference", weights, act, (n, k), tensors)
    backend = select_backend(weight.device, prepared, backend)
    return BACKENDS[backend].prepare(prepared)


def w8a8_matmul(x: torch.Tensor, w: PreparedW8A8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] = Q(x) [..., K] @ Q(W)^T * scales + bias, returned in x's dtype."""
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {w.shape[1]}")
    return BACKENDS[w.backend].matmul(x, w, bias)


# ----------------------------------------------------------------- CUDA (csrc/quantize_rows.cu)

_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def quantize_rows_cuda(x2: torch.Tensor, act: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization of x2 [M, K] (float32 / float16 / bfloat16, CUDA, unit
    stride along K) in one kernel: (q [M, K] int8 | float8_e4m3fn, scales [M, 1] float32).
    Bit for bit what formats.activation.dynamic_scales + quantize give on the same GPU."""
    if x2.dtype not in _SUFFIX:
        raise ValueError(f"quantize_rows_cuda takes float32, float16 or bfloat16 inputs, got {x2.dtype}")
    if x2.ndim != 2 or x2.stride(1) != 1:
        raise ValueError(f"quantize_rows_cuda takes a 2-D input with unit stride along K, got shape {tuple(x2.shape)}, "
                         f"strides {x2.stride()}")
    m, k = x2.shape
    q = torch.empty(m, k, dtype=torch.int8 if act.type == "int8" else torch.float8_e4m3fn, device=x2.device)
    scales = torch.empty(m, 1, dtype=torch.float32, device=x2.device)
    if m:
        threads = min(1024, max(32, 1 << (max(k, 1) - 1).bit_length() >> 2))  # ~4 values per thread
        threads = (threads + 31) // 32 * 32
        cuda.launch(f"quantize_rows_{act.type}_{_SUFFIX[x2.dtype]}", "quantize_rows", (m,), (threads,),
                    (x2, np.int64(x2.stride(0)), q, scales, np.int32(k)))
    return q, scales


def scale_epilogue_cuda(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
                        dtype: torch.dtype) -> torch.Tensor:
    """dtype(float(acc) * sx * sw (+ bias)) in one kernel: acc int32 [M, N] (unit stride
    along N), sx [M, 1] and sw [1, N] float32 scales, bias [N] or None. Bit for bit the
    torch ops' result (float32 products in that order, round-to-nearest-even cast)."""
    if acc.dtype != torch.int32 or acc.ndim != 2 or acc.stride(1) != 1:
        raise ValueError(f"acc must be a 2-D int32 tensor with unit stride along N, got {acc.dtype} {tuple(acc.shape)}")
    if dtype not in _SUFFIX:
        raise ValueError(f"scale_epilogue_cuda writes float32, float16 or bfloat16, got {dtype}")
    m, n = acc.shape
    sx = sx.reshape(m).to(torch.float32).contiguous()
    sw = sw.reshape(n).to(torch.float32).contiguous()
    out = torch.empty(m, n, dtype=dtype, device=acc.device)
    b = bias.to(torch.float32).contiguous() if bias is not None else sw  # any valid pointer when unused
    if m * n:
        blocks = min((m * n + 255) // 256, 65535)
        cuda.launch(f"scale_epilogue_{_SUFFIX[dtype]}", "scale_epilogue", (blocks,), (256,),
                    (acc, np.int64(acc.stride(0)), sx, sw, b, np.int32(bias is not None), out, np.int32(m), np.int32(n)))
    return out
