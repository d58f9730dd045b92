"""The engine's per-layer ops besides the linears: one entry point each, over the backends of the
op of the same name in quantkit.kernels.registry: the torch twin ("reference", here: the
transformers Llama code's own math, so float32 and CPU runs match it exactly) and a fused CUDA
kernel of csrc/engine_ops.cu ("cuda", quantkit.kernels.engine_ops_cuda) for float16 / bfloat16
tensors on a GPU, which falls back to the twin for sizes its kernel does not take.

rms_norm_matmul is the residual add and RMSNorm in front of an integer-weight linear: for one
token the decode kernel runs them in its prologue (quantkit.kernels.int_weight_cuda); its twin is
the two ops it fuses.

Shapes: T tokens (rows), H hidden, Hq / Hk query / KV heads of D dims, cache [slots, Hk, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantkit.kernels import registry
from quantkit.kernels.int_weight import PreparedIntWeight, int_weight_matmul
from quantkit.kernels.registry import register_backend


# ---- RMSNorm with the residual add ---------------------------------------------------------------
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (x alone when residual is None); returns (weight * RMSNorm(h), h).
    x, residual [T, H]."""
    return registry.select_backend("add_rms_norm", x.device, x.dtype).run(x, residual, weight, eps)


@register_backend("add_rms_norm", "reference")
def add_rms_norm_reference(x, residual, weight, eps):
    h = x if residual is None else residual + x
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h


# ---- residual add + RMSNorm + integer-weight matmul ------------------------------------------------
def rms_norm_matmul(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    w: PreparedIntWeight, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (x when residual is None); returns (RMSNorm(h) * norm_weight @ dequant(w)^T
    (+ bias), h), as add_rms_norm and then int_weight_matmul compute them. x, residual [T, K]. By
    w's backend (the weight's layout decides, as for int_weight_matmul)."""
    return registry.backend("rms_norm_matmul", w.backend).run(x, residual, norm_weight, eps, w, bias)


@register_backend("rms_norm_matmul", "reference")
def rms_norm_matmul_reference(x, residual, norm_weight, eps, w, bias=None):
    """The twin: the two ops the fused kernel replaces, each through its own entry point (on the
    CPU and in float32: torch's residual add, RMSNorm as transformers computes it, the reference
    matmul), so that a weight or a call the fused kernel does not take computes as it would unfused."""
    normed, h = add_rms_norm(x, residual, norm_weight, eps)
    return int_weight_matmul(normed, w, bias), h


# ---- SiLU(gate) * up ---------------------------------------------------------------------------
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [T, I] (views of one fused output may share a row stride) -> [T, I]."""
    return registry.select_backend("silu_mul", gate.device, gate.dtype).run(gate, up)


@register_backend("silu_mul", "reference")
def silu_mul_reference(gate, up):
    return F.silu(gate) * up


# ---- RoPE, and K / V into the cache ---------------------------------------------------------------
def rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """q [T, Hq * D], k / v [T, Hk * D] (views of one fused qkv output may share a row stride),
    cos / sin [T, D], slots [T] int64. Writes RoPE(k) and v to the cache at the slots; returns
    RoPE(q) [T, Hq, D]."""
    return registry.select_backend("rope_cache", q.device, q.dtype).run(q, k, v, cos, sin, k_cache, v_cache, slots)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@register_backend("rope_cache", "reference")
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
    of 64 keys (flash-decoding), so C is bounded only by engine_ops_cuda.ATTN_MAX_CONTEXT."""
    rows, b = q.shape[0], context.shape[0]
    if rows % b:
        raise ValueError(f"{rows} query rows do not split over {b} sequences")
    return registry.select_backend("paged_attention", q.device, q.dtype).run(q, k_cache, v_cache, context, positions,
                                                                             scale)


@register_backend("paged_attention", "reference")
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
