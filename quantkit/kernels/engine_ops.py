"""The engine's per-layer ops besides the linears: one entry point each, a torch twin and a
fused CUDA kernel (csrc/engine_ops.cu) used for float16 / bfloat16 tensors on a GPU. The torch
twins are the transformers Llama code's own math, so float32 and CPU runs match it exactly.

Shapes: T tokens (rows), H hidden, Hq / Hk query / KV heads of D dims, cache [slots, Hk, D].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from quantkit.kernels import cuda

_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16"}
_MODULE = "engine_ops"
NORM_MAX_HIDDEN = 8192  # as in the .cu: 1024 threads x 8 registers
ATTN_KEYS_PER_SPLIT = 64  # as in the .cu: the keys of one attention block
ATTN_MAX_CONTEXT = ATTN_KEYS_PER_SPLIT * 65535  # the splits are the grid's y dimension (at most 65535)


def _fused(*tensors: torch.Tensor) -> bool:
    t = tensors[0]
    return t.is_cuda and t.dtype in _SUFFIX and cuda.available()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D view with unit column stride (copied only if needed)."""
    return x if x.stride(-1) == 1 else x.contiguous()


# ---- RMSNorm with the residual add ---------------------------------------------------------------
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (x alone when residual is None); returns (weight * RMSNorm(h), h).
    x, residual [T, H]."""
    if not _fused(x) or x.shape[-1] > NORM_MAX_HIDDEN:
        return add_rms_norm_reference(x, residual, weight, eps)
    x = _rows(x)
    t, h = x.shape
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else x
    r = _rows(residual) if residual is not None else None
    cuda.launch(f"add_rms_norm_{_SUFFIX[x.dtype]}", _MODULE, (t,), (1024,),
                (x, np.int32(x.stride(0)), r if r is not None else np.uint64(0), np.int32(r.stride(0) if r is not None else 0),
                 weight.to(x.dtype).contiguous(), np.float32(eps), out, np.int32(h), res_out, np.int32(h), np.int32(h)), dependent=True)
    return out, res_out


def add_rms_norm_reference(x, residual, weight, eps):
    h = x if residual is None else residual + x
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h


# ---- SiLU(gate) * up ---------------------------------------------------------------------------
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [T, I] (views of one fused output may share a row stride) -> [T, I]."""
    if not _fused(gate) or gate.stride() != up.stride() or gate.stride(-1) != 1:
        return F.silu(gate) * up
    t, i = gate.shape
    out = torch.empty(t, i, dtype=gate.dtype, device=gate.device)
    n = t * i
    cuda.launch(f"silu_mul_{_SUFFIX[gate.dtype]}", _MODULE, (-(-n // 256),), (256,),
                (gate, up, np.int32(gate.stride(0)), out, np.int32(i), np.int32(t)), dependent=True)
    return out


# ---- RoPE, and K / V into the cache ---------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """q [T, Hq * D], k / v [T, Hk * D] (views of one fused qkv output may share a row stride),
    cos / sin [T, D], slots [T] int64. Writes RoPE(k) and v to the cache at the slots; returns
    RoPE(q) [T, Hq, D]."""
    hk, d = k_cache.shape[1:]
    hq = q.shape[1] // d
    if not (_fused(q) and q.stride() == k.stride() == v.stride() and q.stride(-1) == 1 and cos.dtype == q.dtype):
        return rope_cache_reference(q, k, v, cos, sin, k_cache, v_cache, slots)
    t = q.shape[0]
    q_out = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    cos, sin = _rows(cos), _rows(sin)
    n = t * (hq + hk) * (d // 2)
    cuda.launch(f"rope_cache_{_SUFFIX[q.dtype]}", _MODULE, (-(-n // 256),), (256,),
                (q, k, v, np.int32(q.stride(0)), cos, sin, np.int32(cos.stride(0)), slots.contiguous(), q_out, k_cache,
                 v_cache, np.int32(t), np.int32(hq), np.int32(hk), np.int32(d)), dependent=True)
    return q_out


def rope_cache_reference(q, k, v, cos, sin, k_cache, v_cache, slots):
    hk, d = k_cache.shape[1:]
    t = q.shape[0]
    q, k, v = q.reshape(t, -1, d), k.reshape(t, hk, d), v.reshape(t, hk, d)
    cos, sin = cos[:, None, :], sin[:, None, :]
    q = q * cos + _rotate_half(q) * sin
    k_cache[slots] = k * cos + _rotate_half(k) * sin
    v_cache[slots] = v
    return q


# ---- attention over the paged cache ------------------------------------------------------------
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context: torch.Tensor,
                    positions: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B * S, Hq, D] (row b * S + s is token s of sequence b); context [B, C] int64: the cache
    slots of positions 0 .. C - 1 of each sequence; positions [B * S]: a row sees keys
    0 .. positions[row]. Returns [B * S, Hq * D]. The fused kernel splits the context into blocks
    of ATTN_KEYS_PER_SPLIT keys (flash-decoding), so C is bounded only by ATTN_MAX_CONTEXT."""
    rows, hq, d = q.shape
    b, c = context.shape
    if rows % b:
        raise ValueError(f"{rows} query rows do not split over {b} sequences")
    if not _fused(q) or d > 256 or hq % k_cache.shape[1] or c > ATTN_MAX_CONTEXT:
        return paged_attention_reference(q, k_cache, v_cache, context, positions, scale)
    out = torch.empty(rows, hq, d, dtype=q.dtype, device=q.device)
    per_lane = 2 if d <= 64 else 4 if d <= 128 else 8  # head elements per lane, as instantiated in the .cu
    # from C, not from the positions: the same grid for every replay of a context bucket's CUDA graph
    splits = max(-(-c // ATTN_KEYS_PER_SPLIT), 1)
    ws = counters = np.uint64(0)  # one split writes out directly
    if splits > 1:
        ws = torch.empty(rows * hq, splits, d + 2, dtype=torch.float32, device=q.device)  # (m, l, acc[D]) per split
        counters = cuda.counters("paged_attention", q.device, rows * hq)
    cuda.launch(f"paged_attention_{_SUFFIX[q.dtype]}_e{per_lane}", _MODULE, (rows * hq, splits), (256,),
                (q.contiguous(), k_cache, v_cache, context.contiguous(), np.int32(c), positions.contiguous(), out, ws,
                 counters, np.int32(rows // b), np.int32(hq), np.int32(k_cache.shape[1]), np.int32(d),
                 np.float32(scale)), dependent=True)
    return out.view(rows, hq * d)


def paged_attention_reference(q, k_cache, v_cache, context, positions, scale):
    rows, hq, d = q.shape
    b, c = context.shape
    s = rows // b
    mask = torch.arange(c, device=q.device)[None, None, :] <= positions.view(b, s)[:, :, None]  # [B, S, C]
    kb = k_cache[context].transpose(1, 2)  # [B, Hk, C, D]
    vb = v_cache[context].transpose(1, 2)
    qb = q.view(b, s, hq, d).transpose(1, 2)  # [B, Hq, S, D]
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=scale, enable_gqa=True)
    return o.transpose(1, 2).reshape(rows, hq * d)
