"""Launches of csrc/int_weight_mma.cu: the decode (gemv), batch (mma) and dequantize kernels.

Names used below, as in the .cu: T the compute dtype (float16 / bfloat16); N weight rows,
K columns; RB = ceil(N / 32) row blocks; a unit is 32 x 32 weights, a step U = 4 units along
K; NS steps per row block (KS = 4 NS units); PARTS = bits / 4; TR table rows and SPS scale sets
per step (quantkit.kernels.int_weight_layout.geometry). Weight tensors are in the layout
quantkit.kernels.int_weight_layout builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quantkit.kernels import cuda

MODULE = "int_weight_mma"
_T = {torch.float16: "f16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class GemvVariant:
    """One instantiation of the decode kernel's template,
    int_weight_gemv<T, BITS, NT, ASYM, SPS, EPI, D, W, XP, RBK, NORM> under
    __launch_bounds__(W * 32, MB); the fields are those template parameters. Only the
    combinations the .cu instantiates exist (GEMV_BASE, GEMV_ENGINE, the dev variants)."""

    EPI: bool  # the scale multiplies each scale set's float32 mma sums, so dequantization is q - z,
    #            exact in half precision (off: (q - z) * s rounded to T per weight)
    D: int  # steps of weights and scales in flight: loaded this many steps ahead of the one computed
    W: int  # warps per block
    XP: bool  # x loaded together with its step's weights (ahead), else when the step is computed
    MB: int  # resident blocks per multiprocessor that __launch_bounds__ asks for (bounds the registers)
    RBK: bool  # one block per row block, its warps' sums added in shared memory; off: stream-K, each
    #            warp a run of `per` steps across row blocks, split row blocks added through `ws`

    @property
    def suffix(self) -> str:
        """This variant's part of the kernel name (GEMV_KERNEL_N in the .cu)."""
        return f"e{int(self.EPI)}_d{self.D}_w{self.W}_x{int(self.XP)}_b{self.MB}_r{int(self.RBK)}"


def _instance(dtype: torch.dtype, bits: int, asym: bool) -> str:
    return f"{_T[dtype]}_b{bits}_{'asym' if asym else 'sym'}"


def gemv_kernel(dtype: torch.dtype, bits: int, asym: bool, NT: int, SPS: int, variant: GemvVariant, NORM: bool) -> str:
    """The decode kernel instantiated for these template parameters (NT tiles of 8 tokens)."""
    return f"int_weight_gemv_{_instance(dtype, bits, asym)}_nt{NT}_s{SPS}_{variant.suffix}_n{int(NORM)}"


def mma_kernel(dtype: torch.dtype, bits: int, asym: bool, NT: int) -> str:
    return f"int_weight_mma_{_instance(dtype, bits, asym)}_nt{NT}"


def dequant_kernel(dtype: torch.dtype, bits: int, asym: bool) -> str:
    return f"int_weight_dequant_{_instance(dtype, bits, asym)}"


def _ptr(t: torch.Tensor | None):
    return np.uint64(0) if t is None else t


def int_weight_gemv(kernel: str, grid: tuple[int, ...], block: tuple[int, ...], *, x: torch.Tensor,
                    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bias: torch.Tensor | None,
                    y: torch.Tensor, ws: torch.Tensor | None, counters: torch.Tensor, M: int, N: int, K: int,
                    NS: int, RB: int, ldx: int, ldy: int, tr: int, sshift: int, per: int, cmax: int,
                    res: torch.Tensor | None = None, nw: torch.Tensor | None = None, eps: float = 0.0,
                    h_out: torch.Tensor | None = None, shared_mem: int = 0, dependent: bool = False) -> None:
    """The decode kernel: y [M, N] = x [M, K] @ dequant(W)^T (+ bias), M <= 8 * NT <= 16.

    kernel     gemv_kernel(...)
    grid       (RB,) when variant.RBK, else (ceil(RB * NS / (per * W)),)
    block      (32 * W,)
    x          T [M, ldx], rows 16-byte aligned, unit column stride; columns 0 .. K - 1 are read
               (act-order: already in the weight's sorted column order). NORM: the token before
               the residual add and RMSNorm
    w          int32 [RB, KS, PARTS, 32, 4], the repacked words
    scales     T [RB, TR, SPS, 8, 4]; zeros: the same (asymmetric) or None (symmetric)
    bias       T [N] or None
    y          T [M, ldy], written
    ws         float32 [RB, cmax, M, 32]: partial sums of the row blocks warps share (stream-K),
               None where none is shared (RBK, or per a multiple of NS)
    counters   int32 [>= RB], zero: per row block, the warps that have added their sums (the last
               resets it)
    M, N, K    tokens, weight rows, x columns read (a multiple of 8)
    NS, RB     steps per row block, row blocks
    ldx, ldy   row strides of x and y, in elements
    tr, sshift scale table rows and the step -> table row shift
    per        steps per warp
    cmax       the most warps that share one row block (stream-K; 0 with RBK)
    res        NORM: T [1, K], added to x first; None: no residual
    nw, eps    NORM: the RMSNorm weight T [K] and epsilon; nw None when NORM is off
    h_out      NORM: T [1, K], receives x + res; None without a residual
    shared_mem NORM: the normalized token, NS * 128 elements of T; else 0
    dependent  launched early (programmatic dependent launch): the kernel loads its first D steps
               of weights and scales before it waits, so they must not be written by the kernel
               before it
    """
    cuda.launch(kernel, MODULE, grid, block,
                (x, w, scales, _ptr(zeros), _ptr(bias), y, _ptr(ws), counters, np.int32(M), np.int32(N), np.int32(K),
                 np.int32(NS), np.int32(RB), np.int32(ldx), np.int32(ldy), np.int32(tr), np.int32(sshift),
                 np.int32(per), np.int32(cmax), _ptr(res), _ptr(nw), np.float32(eps), _ptr(h_out)),
                shared_mem=shared_mem, dependent=dependent)


def int_weight_mma(kernel: str, grid: tuple[int, ...], block: tuple[int, ...], *, x: torch.Tensor, w: torch.Tensor,
                   scales: torch.Tensor, zeros: torch.Tensor | None, bias: torch.Tensor | None, y: torch.Tensor,
                   ws: torch.Tensor | None, counters: torch.Tensor, M: int, N: int, K: int, NS: int, ldx: int,
                   ldy: int, tr: int, sshift: int, sps: int, steps_per_split: int, shared_mem: int) -> None:
    """The batch kernel: y [M, N] = x [M, K] @ dequant(W)^T (+ bias), any M; each warp streams
    its units through a cp.async ring in shared memory.

    kernel     mma_kernel(...), NT tiles of 8 tokens per block
    grid       (RB, splits, ceil(M / (8 NT))): row block, K split, token chunk
    block      (256,): 8 warps
    x, w, scales, zeros, bias, y: as int_weight_gemv's
    ws         float32 [splits, M, 32 RB]: the splits' partial sums, None with one split
    counters   int32 [>= RB * token chunks], zero (the last block of a tile resets its own)
    M, N, K, NS, ldx, ldy, tr, sshift: as int_weight_gemv's
    sps        scale sets per step (1 or 4)
    steps_per_split  units of K per split
    shared_mem the ring: 8 warps x stages x 32 lanes x (16 * PARTS + 8 (+ 8 asymmetric)) bytes
    """
    cuda.launch(kernel, MODULE, grid, block,
                (x, w, scales, _ptr(zeros), _ptr(bias), y, _ptr(ws), counters, np.int32(M), np.int32(N), np.int32(K),
                 np.int32(NS), np.int32(ldx), np.int32(ldy), np.int32(tr), np.int32(sshift), np.int32(sps),
                 np.int32(steps_per_split)),
                shared_mem=shared_mem)


def int_weight_dequant(kernel: str, grid: tuple[int, ...], block: tuple[int, ...], *, w: torch.Tensor,
                       scales: torch.Tensor, zeros: torch.Tensor | None, out: torch.Tensor, RB: int, NS: int, tr: int,
                       sshift: int, sps: int) -> None:
    """The dense weight for cuBLAS: out = (q - z) * s, one warp per unit.

    kernel     dequant_kernel(...)
    grid       (ceil(RB * KS / 8),); block (256,): 8 warps
    w, scales, zeros: as int_weight_gemv's
    out        T [32 RB, 128 NS], written whole (the padding rows and columns too)
    RB, NS, tr, sshift, sps: as int_weight_mma's
    """
    cuda.launch(kernel, MODULE, grid, block,
                (w, scales, _ptr(zeros), out, np.int32(RB), np.int32(NS), np.int32(tr), np.int32(sshift),
                 np.int32(sps)))
