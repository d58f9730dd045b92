"""Backend "torch" of the W8A8 matmul (quantkit.kernels.w8a8), CUDA only: torch._int_mm (int8 x
int8 -> int32) and torch._scaled_mm (FP8 x FP8 with row-wise scales) on the tensor cores, the
baselines the CUDA kernels of csrc/ have to beat. Where CuPy is installed, dynamic inputs are
quantized by csrc/quantize_rows.cu and the int8 sums scaled by csrc/scale_epilogue.cu (one kernel
each instead of several torch ops), bit for bit as the torch ops compute them.
"""

from __future__ import annotations

import functools

import torch

from quantkit.formats.activation import ActSpec, quantize
from quantkit.kernels import cuda
from quantkit.kernels.launch_quantize_rows import quantize_rows as launch_quantize_rows
from quantkit.kernels.launch_scale_epilogue import scale_epilogue as launch_scale_epilogue
from quantkit.kernels.registry import register_backend
from quantkit.kernels.w8a8 import PreparedW8A8, input_scales

_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}  # the dtypes the kernels take


def _prepare_torch(w: PreparedW8A8) -> PreparedW8A8:
    t = w.tensors
    tensors = {"q_t": t["q"].T, "scale": t["scale"].reshape(1, -1).contiguous()}  # q row-major: q.T is column-major
    if "input_scale" in t:
        tensors["input_scale"] = t["input_scale"]
    return PreparedW8A8("torch", w.weights, w.act, w.shape, tensors)


def _torch_available(device: torch.device, dtype: torch.dtype | None, w: PreparedW8A8) -> bool:
    if device.type != "cuda" or w.grouped:  # _int_mm's sums span the whole row: one weight scale per row
        return False
    n, k = w.shape
    if w.act.type == "int8":
        return k % 8 == 0 and n % 8 == 0
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) >= (8, 9) and k % 16 == 0 and n % 16 == 0


@register_backend("w8a8", "torch", available=_torch_available, prepare=_prepare_torch)
def _matmul_torch(x: torch.Tensor, w: PreparedW8A8, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = w.shape
    x2 = x.reshape(-1, k)
    if w.act.dynamic and cuda.available() and x2.dtype in _SUFFIX:  # one fused kernel instead of ~8 torch ops
        xq, sx = quantize_rows_cuda(x2 if x2.stride(1) == 1 else x2.contiguous(), w.act)
    else:
        sx = input_scales(x2, w, check=False)  # no device sync: a NaN token gets a NaN output row
        xq = quantize(x2, sx, w.act)
    return _quantized_torch(xq, sx, w, bias, x.dtype).reshape(*x.shape[:-1], n)


@register_backend("w8a8_quantized", "torch", available=_torch_available)
def _quantized_torch(xq: torch.Tensor, sx: torch.Tensor, w: PreparedW8A8, bias: torch.Tensor | None,
                     dtype: torch.dtype) -> torch.Tensor:
    t = w.tensors
    m, k = xq.shape
    if w.act.type == "int8":
        if m <= 16:  # _int_mm takes more than 16 rows: pad with zero rows
            xq = torch.cat([xq, xq.new_zeros(17 - m, k)])
        acc = torch._int_mm(xq, t["q_t"])[:m]
        if cuda.available() and dtype in _SUFFIX:  # one pass over the output instead of four
            return scale_epilogue_cuda(acc, sx.expand(m, 1), t["scale"], bias, dtype)
        y = acc.to(torch.float32) * sx * t["scale"]
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(dtype)
    sa = sx.expand(m, 1).contiguous() if sx.numel() == 1 else sx
    out_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    y = _scaled_mm_rowwise(xq, t["q_t"], sa.to(torch.float32), t["scale"], out_dtype)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y.to(dtype)


def _scaled_mm_rowwise(xq: torch.Tensor, wq_t: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """dtype((xq @ wq_t) * sa * sb): FP8 [M, K] x [K, N] column-major, sa [M, 1], sb [1, N] float32.
    Where torch's row-wise kernel refuses dtype (aten's _scaled_mm takes only bfloat16 outputs for
    row-wise scales on builds where CUTLASS's kernel runs them: "Only bf16 high precision output
    types are supported for row-wise scaling"), the sums come out in float32 with unit per-tensor
    scales and the row-wise ones follow, in the reference's order."""
    if _rowwise_takes(xq.device, dtype):
        return torch._scaled_mm(xq, wq_t, scale_a=sa, scale_b=sb, out_dtype=dtype)
    one = torch.ones((), dtype=torch.float32, device=xq.device)
    acc = torch._scaled_mm(xq, wq_t, scale_a=one, scale_b=one, out_dtype=torch.float32)
    return (acc * sa * sb).to(dtype)


@functools.cache
def _rowwise_takes(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._scaled_mm with row-wise scales writes `dtype` on `device` (one 16 x 16 try)."""
    x = torch.zeros(16, 16, dtype=torch.float8_e4m3fn, device=device)
    ones = torch.ones(16, 1, dtype=torch.float32, device=device)
    try:
        torch._scaled_mm(x, x.T, scale_a=ones, scale_b=ones.T.contiguous(), out_dtype=dtype)
    except (RuntimeError, ValueError) as e:
        if "output types are supported for row-wise" not in str(e):
            raise
        return False
    return True


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
        launch_quantize_rows((m,), (threads,), x=x2, ld=x2.stride(0), q=q, s=scales, K=k)
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
        launch_scale_epilogue((blocks,), (256,), acc=acc, lda=acc.stride(0), sx=sx, sw=sw, bias=b,
                              has_bias=bias is not None, out=out, M=m, N=n)
    return out
