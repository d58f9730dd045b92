"""The "cuda" backends of the engine's per-layer ops (quantkit.kernels.engine_ops): the fused kernels
of csrc/engine_ops.cu for float16 / bfloat16 tensors on a GPU. Each takes the sizes and strides its
kernel reads and falls back to the op's torch twin for the rest."""

from __future__ import annotations

import functools

import torch

from quantkit.formats.activation import ActSpec
from quantkit.kernels import cuda
from quantkit.kernels import engine_ops as ops
from quantkit.kernels import launch_engine_ops as launch
from quantkit.kernels.registry import register_backend

NORM_MAX_HIDDEN = 8192  # as in the .cu: 1024 threads x 8 registers
ACT_QUANT_MAX = 1024 * 16  # silu_mul_quant's widest row, as in the .cu: 1024 threads x 16 registers
_QDTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
ATTN_WARPS = 4  # as in the .cu: the warps of an attention block
ATTN_ROUNDS = 4  # as in the .cu: the 16-byte reads of K (and of V) each lane has in flight
ATTN_MAX_SPLITS = 65535  # the splits are the grid's y dimension


def half_on_gpu(device: torch.device, dtype: torch.dtype | None, spec: object = None) -> bool:
    """Where the fused kernels run: float16 / bfloat16 tensors on a CUDA GPU with CuPy (the .cu
    also has float32 instances; float32 keeps the twins, the transformers math, exactly)."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and cuda.available()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D view with unit column stride (copied only if needed)."""
    return x if x.stride(-1) == 1 else x.contiguous()


@register_backend("add_rms_norm", "cuda", available=half_on_gpu)
def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                  eps: float, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] > NORM_MAX_HIDDEN:
        return ops.add_rms_norm_reference(x, residual, weight, eps, offset)
    x = _rows(x)
    t, h = x.shape
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else x
    r = _rows(residual) if residual is not None else None
    if offset:  # Gemma's (offset + w), product in float32 (the weight converts exactly: it is stored in T)
        launch.add_rms_norm_offset((t,), (1024,), x=x, ldx=x.stride(0), res=r, ldr=r.stride(0) if r is not None else 0,
                                   w=weight.to(x.dtype).contiguous(), eps=eps, offset=offset, out=out, ldo=h,
                                   res_out=res_out, ldro=h, H=h)
        return out, res_out
    launch.add_rms_norm((t,), (1024,), x=x, ldx=x.stride(0), res=r, ldr=r.stride(0) if r is not None else 0,
                        w=weight.to(x.dtype).contiguous(), eps=eps, out=out, ldo=h, res_out=res_out, ldro=h, H=h)
    return out, res_out


@register_backend("qk_rms_norm", "cuda", available=half_on_gpu)
def _qk_rms_norm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 eps: float, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = q_weight.shape[0]
    if d > 256 or any(t.stride(-1) != 1 for t in (q, k, v)):  # a head lives in one warp, 8 elements a lane
        return ops.qk_rms_norm_reference(q, k, v, q_weight, k_weight, eps, offset)
    t, hq, hk = q.shape[0], q.shape[1] // d, k.shape[1] // d
    out = torch.empty(t, (hq + 2 * hk) * d, dtype=q.dtype, device=q.device)
    warps = t * (hq + 2 * hk)
    launch.qk_rms_norm((-(-warps // 8),), (256,), q=q, ldq=q.stride(0), k=k, ldk=k.stride(0), v=v, ldv=v.stride(0),
                       qw=q_weight.to(q.dtype).contiguous(), kw=k_weight.to(q.dtype).contiguous(), eps=eps,
                       offset=offset, out=out, rows=t, Hq=hq, Hk=hk, D=d)
    return tuple(out.split([hq * d, hk * d, hk * d], dim=-1))


@register_backend("silu_mul", "cuda", available=half_on_gpu)
def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.stride() != up.stride() or gate.stride(-1) != 1:  # the kernel reads both with one row stride
        return ops.silu_mul_reference(gate, up)
    t, i = gate.shape
    out = torch.empty(t, i, dtype=gate.dtype, device=gate.device)
    n = t * i
    launch.silu_mul((-(-n // 256),), (256,), g=gate, u=up, ld_in=gate.stride(0), out=out, I=i, rows=t)
    return out


@register_backend("add_rms_norm_quant", "cuda", available=half_on_gpu)
def _add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                        act: ActSpec, offset: float = 0.0, input_scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.shape[-1] > NORM_MAX_HIDDEN:
        return ops.add_rms_norm_quant_reference(x, residual, weight, eps, act, offset, input_scale)
    x = _rows(x)
    t, h = x.shape
    q = torch.empty(t, h, dtype=_QDTYPE[act.type], device=x.device)
    scales = torch.empty(t, 1, dtype=torch.float32, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else x
    r = _rows(residual) if residual is not None else None
    launch.add_rms_norm_quant((t,), (1024,), x=x, ldx=x.stride(0), res=r, ldr=r.stride(0) if r is not None else 0,
                              w=weight.to(x.dtype).contiguous(), eps=eps, offset=offset, given=_given(input_scale),
                              q=q, scale=scales, res_out=res_out, ldro=h, H=h)
    return q, scales, res_out


@register_backend("silu_mul_quant", "cuda", available=half_on_gpu)
def _silu_mul_quant(gate: torch.Tensor, up: torch.Tensor, act: ActSpec,
                    input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    t, i = gate.shape
    if gate.stride() != up.stride() or gate.stride(-1) != 1 or i > ACT_QUANT_MAX:
        return ops.silu_mul_quant_reference(gate, up, act, input_scale)
    q = torch.empty(t, i, dtype=_QDTYPE[act.type], device=gate.device)
    scales = torch.empty(t, 1, dtype=torch.float32, device=gate.device)
    threads = min(1024, 32 * -(-i // 128))  # ~4 values a thread (at most 16: i <= ACT_QUANT_MAX)
    launch.silu_mul_quant((t,), (threads,), g=gate, u=up, ld_in=gate.stride(0), given=_given(input_scale), q=q,
                          scale=scales, I=i)
    return q, scales


def _given(input_scale: torch.Tensor | None) -> torch.Tensor | None:
    """A static scale as the kernels read it: float32, one value, contiguous."""
    return None if input_scale is None else input_scale.to(torch.float32).reshape(1).contiguous()


@register_backend("gelu_tanh_mul", "cuda", available=half_on_gpu)
def _gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.stride() != up.stride() or gate.stride(-1) != 1:  # the kernel reads both with one row stride
        return ops.gelu_tanh_mul_reference(gate, up)
    t, i = gate.shape
    out = torch.empty(t, i, dtype=gate.dtype, device=gate.device)
    n = t * i
    launch.gelu_tanh_mul((-(-n // 256),), (256,), g=gate, u=up, ld_in=gate.stride(0), out=out, I=i, rows=t)
    return out


def _cache_fits(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether a kernel is instantiated for this cache: of q's dtype, or FP8 E4M3 beside float16 / bfloat16."""
    return cache.dtype == q.dtype or (cache.dtype == torch.float8_e4m3fn and q.dtype in (torch.float16, torch.bfloat16))


@register_backend("rope_cache", "cuda", available=half_on_gpu)
def _rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    hk, d = k_cache.shape[1:]
    hq = q.shape[1] // d
    if (not (q.stride() == k.stride() == v.stride() and q.stride(-1) == 1 and cos.dtype == q.dtype) or cos.shape[1] != d
            or not _cache_fits(q, k_cache)):
        # (cos narrower than the head: partial rotary, which the kernel does not take)
        return ops.rope_cache_reference(q, k, v, cos, sin, k_cache, v_cache, slots)
    t = q.shape[0]
    q_out = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    cos, sin = _rows(cos), _rows(sin)
    n = t * (hq + hk) * (d // 2)
    launch.rope_cache((-(-n // 256),), (256,), q=q, k=k, v=v, ld_in=q.stride(0), cos=cos, sin=sin,
                      ld_cs=cos.stride(0), slots=slots.contiguous(), q_out=q_out, kc=k_cache, vc=v_cache, rows=t,
                      Hq=hq, Hk=hk, D=d)
    return q_out


def attention_lanes(d: int, cache_dtype: torch.dtype) -> int | None:
    """G, the lanes that read one cached key of head size d, 16 bytes each (the kernel's template
    parameter: 4, 8, 16 or 32); None where the kernel cannot take the head (d not a multiple of the
    elements in 16 bytes, or wider than 32 lanes' reads)."""
    per_lane = 16 // cache_dtype.itemsize
    if d % per_lane:
        return None
    g = 4
    while g * per_lane < d:
        g *= 2
    return g if g <= 32 else None


@functools.cache
def _wave(name: str, device: torch.device) -> int:
    """The attention blocks the GPU holds at once: multiprocessors x resident blocks of this kernel."""
    return (torch.cuda.get_device_properties(device).multi_processor_count
            * cuda.resident_blocks(name, launch.MODULE, 32 * ATTN_WARPS, 0))


def keys_per_split(pairs: int, c: int, g: int, wave: int) -> int:
    """The keys one attention block takes, for `pairs` (row, head) blocks per split and a context of c:
    from one block iteration's keys (ATTN_WARPS warps x ATTN_ROUNDS rounds x 32 / G keys), doubled while
    the context needs more than one split and the grid keeps at least `wave` blocks (all the GPU
    holds at once). A large batch gets one split (no merge); batch 1, many short ones (flash-decoding)."""
    kps = ATTN_WARPS * ATTN_ROUNDS * 32 // g
    while kps < c and pairs * -(-c // (2 * kps)) >= wave:
        kps *= 2
    while -(-c // kps) > ATTN_MAX_SPLITS:
        kps *= 2
    return kps


@register_backend("paged_attention", "cuda", available=half_on_gpu)
def _paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context: torch.Tensor,
                     positions: torch.Tensor, scale: float, window: int | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    rows, hq, d = q.shape
    b, c = context.shape
    g = attention_lanes(d, k_cache.dtype)
    if (g is None or hq % k_cache.shape[1] or not _cache_fits(q, k_cache)
            or not all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (k_cache, v_cache))):
        return ops.paged_attention_reference(q, k_cache, v_cache, context, positions, scale, window, softcap)
    out = torch.empty(rows, hq, d, dtype=q.dtype, device=q.device)
    limited = window is not None or softcap is not None  # the same kernel with its key range and scores limited
    name = f"paged_attention{'_window' if limited else ''}_{launch._T[q.dtype]}{launch._kv(k_cache)}_g{g}"
    wave = _wave(name, q.device)
    # from C, not from the positions: the same grid for every replay of a context bucket's CUDA graph
    kps = keys_per_split(rows * hq, c, g, wave)
    splits = max(-(-c // kps), 1)
    ws = counters = None  # one split writes out directly
    if splits > 1:
        ws = torch.empty(rows * hq, splits, d + 2, dtype=torch.float32, device=q.device)  # (m, l, acc[D]) per split
        counters = cuda.counters("paged_attention", q.device, rows * hq)
    common = dict(G=g, q=q.contiguous(), kc=k_cache, vc=v_cache, context=context.contiguous(), C=c,
                  pos=positions.contiguous(), out=out, ws=ws, counters=counters, S=rows // b, Hq=hq,
                  Hk=k_cache.shape[1], D=d, kps=kps, scale=scale)
    if limited:
        launch.paged_attention_window((rows * hq, splits), (32 * ATTN_WARPS,), **common, window=window or 0,
                                      softcap=softcap or 0.0)
    else:
        launch.paged_attention((rows * hq, splits), (32 * ATTN_WARPS,), **common)
    return out.view(rows, hq * d)
