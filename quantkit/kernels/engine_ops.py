"""The engine's per-layer ops besides the linears: one entry point each, over the backends of the
op of the same name in quantkit.kernels.registry: the torch twin ("reference", here: the
transformers code's own math (Llama's; Gemma's where an argument asks for it: the norm's offset,
soft-capping), so float32 and CPU runs match it exactly) and a fused CUDA kernel of
csrc/engine_ops.cu ("cuda", quantkit.kernels.engine_ops_cuda) for float16 / bfloat16 tensors on a
GPU, which falls back to the twin for sizes its kernel does not take. softcap has no CUDA kernel:
its twin (three elementwise torch kernels on the logits) is what runs on a GPU too.

rms_norm_matmul is the residual add and RMSNorm in front of an integer-weight linear: for one
token the decode kernel runs them in its prologue (quantkit.kernels.int_weight_cuda); its twin is
the two ops it fuses.

add_rms_norm_quant and silu_mul_quant are add_rms_norm and silu_mul in front of a W8A8 linear:
they write their output quantized for it (int8 or FP8, a scale per token), so that the linear's
matmul starts from there (kernels.w8a8.w8a8_matmul_quantized) and its own quantization kernel
does not run. Their twins are the ops they fuse, each through its entry point, then the
quantization of formats.activation (what the W8A8 linear does to its input).

Shapes: T tokens (rows), H hidden, Hq / Hk query / KV heads of D dims, cache [slots, Hk, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantkit.formats.activation import ActSpec, check_input_scale, dynamic_scales, fp8_saturate, quantize
from quantkit.kernels import registry
from quantkit.kernels.int_weight import PreparedIntWeight, int_weight_matmul
from quantkit.kernels.registry import register_backend


# ---- RMSNorm with the residual add ---------------------------------------------------------------
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (x alone when residual is None); returns ((offset + weight) * RMSNorm(h), h).
    x, residual [T, H]. The roundings are the transformers code's: offset 0 is Llama's RMSNorm
    (the normalized row rounded to x's dtype, then times weight in that dtype); any other offset
    is Gemma's (normalized and scaled by offset + weight in float32, rounded once)."""
    return registry.select_backend("add_rms_norm", x.device, x.dtype).run(x, residual, weight, eps, offset)


@register_backend("add_rms_norm", "reference")
def add_rms_norm_reference(x, residual, weight, eps, offset=0.0):
    h = x if residual is None else residual + x
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (offset + weight.float())).to(h.dtype), h
    return weight * normed.to(h.dtype), h


# ---- per-head RMSNorm of q and k (Qwen3, Gemma 3) -------------------------------------------------
def qk_rms_norm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                eps: float, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm over each head of q [T, Hq * D] and k [T, Hk * D] (weights [D], roundings as
    add_rms_norm's for the offset); v [T, Hk * D] passes through. Returns (q', k', v): views of one
    [T, (Hq + 2 Hk) * D] tensor, so that they share the row stride rope_cache's kernel reads (q, k,
    v may be views of one fused output, or separate tensors)."""
    return registry.select_backend("qk_rms_norm", q.device, q.dtype).run(q, k, v, q_weight, k_weight, eps, offset)


@register_backend("qk_rms_norm", "reference")
def qk_rms_norm_reference(q, k, v, q_weight, k_weight, eps, offset=0.0):
    d = q_weight.shape[0]
    t = q.shape[0]
    qn = add_rms_norm_reference(q.reshape(t, -1, d), None, q_weight, eps, offset)[0]
    kn = add_rms_norm_reference(k.reshape(t, -1, d), None, k_weight, eps, offset)[0]
    out = torch.cat([qn.reshape(t, -1), kn.reshape(t, -1), v], dim=-1)
    return tuple(out.split([q.shape[1], k.shape[1], v.shape[1]], dim=-1))


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


# ---- the same two ops writing a W8A8 linear's input: quantized per token ---------------------------
def add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                       act: ActSpec, offset: float = 0.0, input_scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """add_rms_norm with its output quantized as a W8A8 linear quantizes its input: returns (q, s, h),
    q [T, H] int8 or float8_e4m3fn (act.type), s float32 [T, 1], h = x + residual. Scales per token
    when act.dynamic (a row holding NaN gets a NaN scale: no device sync checks it), else every row
    takes the static `input_scale` (float32, one value)."""
    check_input_scale(act, input_scale)
    return registry.select_backend("add_rms_norm_quant", x.device, x.dtype).run(x, residual, weight, eps, act, offset,
                                                                                input_scale)


@register_backend("add_rms_norm_quant", "reference")
def add_rms_norm_quant_reference(x, residual, weight, eps, act, offset=0.0, input_scale=None):
    """The twin: add_rms_norm through its entry point, then formats.activation's quantization of its
    output: on a GPU the unfused engine's ops, bit for bit."""
    normed, h = add_rms_norm(x, residual, weight, eps, offset)
    return (*_quantize_rows(normed, act, input_scale), h)


def silu_mul_quant(gate: torch.Tensor, up: torch.Tensor, act: ActSpec,
                   input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """silu_mul with its output quantized as add_rms_norm_quant's: returns (q [T, I], s [T, 1])."""
    check_input_scale(act, input_scale)
    return registry.select_backend("silu_mul_quant", gate.device, gate.dtype).run(gate, up, act, input_scale)


@register_backend("silu_mul_quant", "reference")
def silu_mul_quant_reference(gate, up, act, input_scale=None):
    """The twin: silu_mul through its entry point, then formats.activation's quantization."""
    return _quantize_rows(silu_mul(gate, up), act, input_scale)


def _quantize_rows(x: torch.Tensor, act: ActSpec, input_scale: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (q [T, K], s float32 [T, 1]) by formats.activation: per-token scales (unchecked for
    NaN) when act.dynamic, else input_scale for every row."""
    if act.dynamic:
        s = dynamic_scales(x, act, check=False)
    else:
        s = input_scale.to(device=x.device, dtype=torch.float32).reshape(1, 1).expand(x.shape[0], 1).contiguous()
    return quantize(x, s, act), s



# ---- GELU-tanh(gate) * up (Gemma's gelu_pytorch_tanh) ----------------------------------------------
def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [T, I] (views of one fused output may share a row stride) -> [T, I]:
    gelu(gate, approximate="tanh") * up, transformers' GELUTanh."""
    return registry.select_backend("gelu_tanh_mul", gate.device, gate.dtype).run(gate, up)


@register_backend("gelu_tanh_mul", "reference")
def gelu_tanh_mul_reference(gate, up):
    return F.gelu(gate, approximate="tanh") * up


# ---- tanh soft-capping (Gemma 2's final logits) ----------------------------------------------------
def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap), elementwise, in x's dtype (transformers' order: divide, tanh, multiply)."""
    return registry.select_backend("softcap", x.device, x.dtype).run(x, cap)


@register_backend("softcap", "reference")
def softcap_reference(x, cap):
    return torch.tanh(x / cap) * cap


# ---- RoPE, and K / V into the cache ---------------------------------------------------------------
def rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """q [T, Hq * D], k / v [T, Hk * D] (views of one fused qkv output may share a row stride),
    cos / sin [T, R], R <= D (R < D: partial rotary, as Phi-3's partial_rotary_factor: the first R
    elements of each head rotate, the rest pass), slots [T] int64. Writes RoPE(k) and v to the
    cache at the slots (a cache of float8_e4m3fn: rounded to nearest even, saturating at +-448);
    returns RoPE(q) [T, Hq, D]."""
    return registry.select_backend("rope_cache", q.device, q.dtype).run(q, k, v, cos, sin, k_cache, v_cache, slots)


def _to_cache(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """x in the cache's dtype (an FP8 cache: rounded and saturating, formats.activation.fp8_saturate)."""
    return fp8_saturate(x) if cache.dtype == torch.float8_e4m3fn else x.to(cache.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@register_backend("rope_cache", "reference")
def rope_cache_reference(q, k, v, cos, sin, k_cache, v_cache, slots):
    hk, d = k_cache.shape[1:]
    t = q.shape[0]
    q, k, v = q.reshape(t, -1, d), k.reshape(t, hk, d), v.reshape(t, hk, d)
    r = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if r < d:  # partial rotary: transformers' Phi-3 rotates x[..., :r] and concatenates the rest
        q = torch.cat([q[..., :r] * cos + _rotate_half(q[..., :r]) * sin, q[..., r:]], dim=-1)
        k_rot = torch.cat([k[..., :r] * cos + _rotate_half(k[..., :r]) * sin, k[..., r:]], dim=-1)
        k_cache[slots] = _to_cache(k_rot, k_cache)
        v_cache[slots] = _to_cache(v, v_cache)
        return q
    q = q * cos + _rotate_half(q) * sin
    k_cache[slots] = _to_cache(k * cos + _rotate_half(k) * sin, k_cache)
    v_cache[slots] = _to_cache(v, v_cache)
    return q


# ---- attention over the paged cache ------------------------------------------------------------
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context: torch.Tensor,
                    positions: torch.Tensor, scale: float, window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """q [B * S, Hq, D] (row b * S + s is token s of sequence b); context [B, C] int64: the cache
    slots of positions 0 .. C - 1 of each sequence; positions [B * S]: a row sees keys
    0 .. positions[row], or with a sliding `window` only positions[row] - window + 1 .. positions[row]
    (transformers' sliding_window: a key at distance < window). softcap: scores (q.k * scale) go
    through softcap * tanh(scores / softcap) before the mask and the softmax (Gemma 2). Returns
    [B * S, Hq * D]. The fused kernel splits the context over as many blocks as fill the GPU
    (flash-decoding; engine_ops_cuda.keys_per_split), so C has no bound of its own. The cache may be
    float8_e4m3fn (an FP8 KV cache); its entries are read exactly into q's dtype."""
    rows, b = q.shape[0], context.shape[0]
    if rows % b:
        raise ValueError(f"{rows} query rows do not split over {b} sequences")
    if window is not None and window < 1:
        raise ValueError(f"a sliding window must be at least 1 key, got {window}")
    return registry.select_backend("paged_attention", q.device, q.dtype).run(q, k_cache, v_cache, context, positions,
                                                                             scale, window, softcap)


@register_backend("paged_attention", "reference")
def paged_attention_reference(q, k_cache, v_cache, context, positions, scale, window=None, softcap=None):
    rows, hq, d = q.shape
    b, c = context.shape
    s = rows // b
    keys = torch.arange(c, device=q.device)[None, None, :]
    pos = positions.view(b, s)[:, :, None]
    mask = keys <= pos  # [B, S, C]
    if window is not None:
        mask = mask & (keys > pos - window)
    kb = k_cache[context].to(q.dtype).transpose(1, 2)  # [B, Hk, C, D]
    vb = v_cache[context].to(q.dtype).transpose(1, 2)
    qb = q.view(b, s, hq, d).transpose(1, 2)  # [B, Hq, S, D]
    if softcap is not None:
        o = capped_attention(qb, kb, vb, mask[:, None], scale, softcap)
    else:
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=scale, enable_gqa=True)
    return o.transpose(1, 2).reshape(rows, hq * d)


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     softcap: float) -> torch.Tensor:
    """Soft-capped attention as transformers' Gemma 2 eager attention computes it (torch's fused
    attention has no capping): q [B, Hq, S, D], k / v [B, Hk, C, D] (GQA: Hq a multiple of Hk),
    mask [B, 1, S, C] bool (True: attend) -> [B, Hq, S, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)
