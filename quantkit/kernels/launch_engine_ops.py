"""Launches of csrc/engine_ops.cu, instantiated per T = float16 / bfloat16 / float32 (the kernel's
name ends in T's: _f16, _bf16, _f32, taken from the first tensor's dtype; the cache kernels of an FP8
KV cache add _kv8, taken from the cache's dtype). Every kernel here waits
for the previous one itself (pdl_start in the .cu), so all are launched as dependent (early, where
the GPU has programmatic dependent launch)."""

from __future__ import annotations

import numpy as np
import torch

from quantkit.kernels import cuda

MODULE = "engine_ops"
_T = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
_Q = {torch.float8_e4m3fn: "fp8", torch.int8: "int8"}


def _kv(cache: torch.Tensor) -> str:
    """The kernel name's cache part: "" for a cache of T, "_kv8" for one of FP8 E4M3 (f16 / bf16 T only)."""
    return "_kv8" if cache.dtype == torch.float8_e4m3fn else ""


def _ptr(t: torch.Tensor | None):
    return np.uint64(0) if t is None else t


def add_rms_norm(grid: tuple[int, ...], block: tuple[int, ...], *, x: torch.Tensor, ldx: int,
                 res: torch.Tensor | None, ldr: int, w: torch.Tensor, eps: float, out: torch.Tensor, ldo: int,
                 res_out: torch.Tensor, ldro: int, H: int) -> None:
    """h = x (+ res), rounded to T; out = w * T(h * rsqrt(mean(h^2) + eps)); res_out = h.

    grid       (rows,): one block per row
    block      (1024,): the row lives in 1024 threads x 8 registers, so H <= 8192
    x          T [rows, ldx], unit column stride
    res, ldr   T [rows, ldr] added to x, or None (and ldr 0): no residual
    w          T [H], contiguous
    eps        the RMSNorm epsilon
    out, ldo   T [rows, ldo], written
    res_out, ldro  T [rows, ldro], receives h (may be x itself when res is None)
    H          the row width
    """
    cuda.launch(f"add_rms_norm_{_T[x.dtype]}", MODULE, grid, block,
                (x, np.int32(ldx), _ptr(res), np.int32(ldr), w, np.float32(eps), out, np.int32(ldo), res_out,
                 np.int32(ldro), np.int32(H)), dependent=True)


def silu_mul(grid: tuple[int, ...], block: tuple[int, ...], *, g: torch.Tensor, u: torch.Tensor, ld_in: int,
             out: torch.Tensor, I: int, rows: int) -> None:  # noqa: E741 (the kernel's name)
    """out = T(T(silu(g)) * u), one thread per element.

    grid       (ceil(rows * I / 256),); block (256,)
    g, u       T [rows, ld_in] each, unit column stride (views of one fused gate/up output may
               share the row stride ld_in)
    out        T [rows, I], contiguous, written
    I, rows    the intermediate size and the token count
    """
    cuda.launch(f"silu_mul_{_T[g.dtype]}", MODULE, grid, block,
                (g, u, np.int32(ld_in), out, np.int32(I), np.int32(rows)), dependent=True)


def rope_cache(grid: tuple[int, ...], block: tuple[int, ...], *, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               ld_in: int, cos: torch.Tensor, sin: torch.Tensor, ld_cs: int, slots: torch.Tensor,
               q_out: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, rows: int, Hq: int, Hk: int, D: int) -> None:
    """q' = T(T(q cos) + T(rot(q) sin)) into q_out, the same for k into the cache, v copied to it.

    grid       (ceil(rows * (Hq + Hk) * D / 2 / 256),): one thread per rotated pair; block (256,)
    q          T [rows, Hq * D]; k, v: T [rows, Hk * D]; all three with row stride ld_in and unit
               column stride (views of one fused qkv output)
    cos, sin   T [rows, D] with row stride ld_cs, unit column stride
    slots      int64 [rows], contiguous: the cache slot of each token
    q_out      T [rows, Hq, D], contiguous, written
    kc, vc     T or float8_e4m3fn [slots, Hk, D], contiguous: the layer's cache, written at the slots
               (FP8: k' and v rounded to nearest even, saturating at +-448)
    rows, Hq, Hk, D: tokens, query heads, KV heads, head size
    """
    cuda.launch(f"rope_cache_{_T[q.dtype]}{_kv(kc)}", MODULE, grid, block,
                (q, k, v, np.int32(ld_in), cos, sin, np.int32(ld_cs), slots, q_out, kc, vc, np.int32(rows),
                 np.int32(Hq), np.int32(Hk), np.int32(D)), dependent=True)


def paged_attention(grid: tuple[int, ...], block: tuple[int, ...], *, G: int, q: torch.Tensor, kc: torch.Tensor,
                    vc: torch.Tensor, context: torch.Tensor, C: int, pos: torch.Tensor, out: torch.Tensor,
                    ws: torch.Tensor | None, counters: torch.Tensor | None, S: int, Hq: int, Hk: int, D: int,
                    kps: int, scale: float) -> None:
    """out[r, h] = softmax(q k^T * scale) v over keys 0 .. pos[r] of row r's sequence, read through
    its slot list; split over blocks of kps keys (flash-decoding) and merged in split order.

    grid       (rows * Hq, splits): one block per (row, head) and split of kps keys; block (32 * ATTN_WARPS,)
    G          lanes per key (template parameter: 4, 8, 16 or 32), each reading 16 bytes of the head:
               D <= G * (8 for a cache of f16 / bf16, 16 of FP8, 4 of f32), D a multiple of that
    q          T [rows, Hq, D], contiguous; row b * S + s is token s of sequence b
    kc, vc     T or float8_e4m3fn [slots, Hk, D], contiguous, 16-byte aligned: the layer's cache (Hq a
               multiple of Hk: GQA)
    context    int64 [B, C], contiguous: the cache slots of positions 0 .. C - 1 of each sequence
    C          the context length (columns of context)
    pos        int64 [rows], contiguous: row r attends to keys 0 .. pos[r]
    out        T [rows, Hq, D], contiguous, written
    ws         float32 [rows * Hq, splits, D + 2]: each split's (max, sum, D accumulators), None
               with one split (it writes out directly)
    counters   int32 [>= rows * Hq], zero: per (row, head), the splits done (the last resets it);
               None with one split
    S, Hq, Hk, D: tokens per sequence, query heads, KV heads, head size
    kps        keys per split (splits = ceil(C / kps))
    scale      the softmax scale
    """
    cuda.launch(f"paged_attention_{_T[q.dtype]}{_kv(kc)}_g{G}", MODULE, grid, block,
                (q, kc, vc, context, np.int32(C), pos, out, _ptr(ws), _ptr(counters), np.int32(S), np.int32(Hq),
                 np.int32(Hk), np.int32(D), np.int32(kps), np.float32(scale)), dependent=True)


# ---- the kernels of the families beyond Llama ------------------------------------------------------
def add_rms_norm_offset(grid: tuple[int, ...], block: tuple[int, ...], *, x: torch.Tensor, ldx: int,
                        res: torch.Tensor | None, ldr: int, w: torch.Tensor, eps: float, offset: float,
                        out: torch.Tensor, ldo: int, res_out: torch.Tensor, ldro: int, H: int) -> None:
    """Gemma's RMSNorm: h = x (+ res), rounded to T; out = T(h * rsqrt(mean(h^2) + eps) * (offset + w)),
    the product in float32 and rounded once. Arguments as add_rms_norm's, and offset (1.0 for Gemma)."""
    cuda.launch(f"add_rms_norm_offset_{_T[x.dtype]}", MODULE, grid, block,
                (x, np.int32(ldx), _ptr(res), np.int32(ldr), w, np.float32(eps), np.float32(offset), out,
                 np.int32(ldo), res_out, np.int32(ldro), np.int32(H)), dependent=True)


def gelu_tanh_mul(grid: tuple[int, ...], block: tuple[int, ...], *, g: torch.Tensor, u: torch.Tensor, ld_in: int,
                  out: torch.Tensor, I: int, rows: int) -> None:  # noqa: E741 (the kernel's name)
    """out = T(T(gelu_tanh(g)) * u), one thread per element; arguments as silu_mul's."""
    cuda.launch(f"gelu_tanh_mul_{_T[g.dtype]}", MODULE, grid, block,
                (g, u, np.int32(ld_in), out, np.int32(I), np.int32(rows)), dependent=True)


def qk_rms_norm(grid: tuple[int, ...], block: tuple[int, ...], *, q: torch.Tensor, ldq: int, k: torch.Tensor,
                ldk: int, v: torch.Tensor, ldv: int, qw: torch.Tensor, kw: torch.Tensor, eps: float, offset: float,
                out: torch.Tensor, rows: int, Hq: int, Hk: int, D: int) -> None:
    """RMSNorm over each head of q and k, v copied, into one buffer.

    grid       (ceil(rows * (Hq + 2 Hk) / 8),): one warp per (token, head); block (256,)
    q, ldq     T [rows, Hq * D] with row stride ldq, unit column stride (k, ldk and v, ldv: Hk heads)
    qw, kw     T [D], contiguous: the q and k norms' weights
    eps        the RMSNorm epsilon
    offset     0: Llama's rounding (w * T(x / rms)); else Gemma's (T(x / rms * (offset + w)))
    out        T [rows, (Hq + 2 Hk) * D], contiguous, written: normalized q, normalized k, v
    rows, Hq, Hk, D: tokens, query heads, KV heads, head size (D <= 256)
    """
    cuda.launch(f"qk_rms_norm_{_T[q.dtype]}", MODULE, grid, block,
                (q, np.int32(ldq), k, np.int32(ldk), v, np.int32(ldv), qw, kw, np.float32(eps), np.float32(offset),
                 out, np.int32(rows), np.int32(Hq), np.int32(Hk), np.int32(D)), dependent=True)


def paged_attention_window(grid: tuple[int, ...], block: tuple[int, ...], *, G: int, q: torch.Tensor,
                           kc: torch.Tensor, vc: torch.Tensor, context: torch.Tensor, C: int, pos: torch.Tensor,
                           out: torch.Tensor, ws: torch.Tensor | None, counters: torch.Tensor | None, S: int, Hq: int,
                           Hk: int, D: int, kps: int, scale: float, window: int, softcap: float) -> None:
    """paged_attention (the same arguments, grid and workspace) over the keys pos[r] - window + 1 ..
    pos[r] only (window 0: all of 0 .. pos[r]), each score s (scale included) soft-capped to
    softcap * tanh(s / softcap) (softcap 0: none)."""
    cuda.launch(f"paged_attention_window_{_T[q.dtype]}{_kv(kc)}_g{G}", MODULE, grid, block,
                (q, kc, vc, context, np.int32(C), pos, out, _ptr(ws), _ptr(counters), np.int32(S), np.int32(Hq),
                 np.int32(Hk), np.int32(D), np.int32(kps), np.float32(scale), np.int32(window), np.float32(softcap)),
                dependent=True)


# ---- the ops in front of a W8A8 linear, writing its input quantized per token ----------------------
def add_rms_norm_quant(grid: tuple[int, ...], block: tuple[int, ...], *, x: torch.Tensor, ldx: int,
                       res: torch.Tensor | None, ldr: int, w: torch.Tensor, eps: float, offset: float,
                       given: torch.Tensor | None, q: torch.Tensor, scale: torch.Tensor, res_out: torch.Tensor,
                       ldro: int, H: int) -> None:
    """add_rms_norm's output (offset 0: Llama's rounding; else add_rms_norm_offset's) quantized per row,
    as csrc/quantize_rows.cu computes it: s = absmax / 448 (fp8) or / 127.5 (int8), q = the row over s.
    The kernel: add_rms_norm_quant_<q type>_<T>, T = x's dtype (float16 / bfloat16).

    grid, block, x, ldx, res, ldr, w, eps, res_out, ldro, H: as add_rms_norm's
    offset     0: Llama's norm; else Gemma's (offset + w)
    given      float32 [1]: a static per-tensor scale used for every row, or None: each row's own
    q          float8_e4m3fn or int8 [rows, H], contiguous, written
    scale      float32 [rows, 1], contiguous, written: each row's scale
    """
    cuda.launch(f"add_rms_norm_quant_{_Q[q.dtype]}_{_T[x.dtype]}", MODULE, grid, block,
                (x, np.int32(ldx), _ptr(res), np.int32(ldr), w, np.float32(eps), np.float32(offset), _ptr(given), q,
                 scale, res_out, np.int32(ldro), np.int32(H)), dependent=True)


def silu_mul_quant(grid: tuple[int, ...], block: tuple[int, ...], *, g: torch.Tensor, u: torch.Tensor, ld_in: int,
                   given: torch.Tensor | None, q: torch.Tensor, scale: torch.Tensor, I: int) -> None:  # noqa: E741
    """silu_mul's output quantized per row, as add_rms_norm_quant quantizes. The kernel:
    silu_mul_quant_<q type>_<T>, T = g's dtype (float16 / bfloat16).

    grid       (rows,): one block per row
    block      (threads,): a multiple of 32, at most 1024, with threads * 16 >= I (the row in registers)
    g, u, ld_in, I: as silu_mul's
    given, q, scale: as add_rms_norm_quant's (q [rows, I])
    """
    cuda.launch(f"silu_mul_quant_{_Q[q.dtype]}_{_T[g.dtype]}", MODULE, grid, block,
                (g, u, np.int32(ld_in), _ptr(given), q, scale, np.int32(I)), dependent=True)
