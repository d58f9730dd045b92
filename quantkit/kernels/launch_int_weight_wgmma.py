"""Launches of csrc/int_weight_wgmma.cu and csrc/int_weight_wgmma_ws.cu: the Hopper (sm_90a) GEMMs for
4-bit (and, warp-specialized, 8-bit) weights and many tokens.

Names as in quantkit.kernels.launch_int_weight_mma (T, N, K, RB, KS, TR, SPS); a k-tile is 64
columns (two 32-column units), a block tile BM[kind] weight rows x BN tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from quantkit.kernels import cuda

MODULE = "int_weight_wgmma"  # rs
MODULE_WS = "int_weight_wgmma_ws"  # ws, ws4, and x_tiles
BK = 64  # columns per k-tile
TILES = (32, 64, 128, 256)  # the token tiles (BN) the .cu instantiates
# The variants, all with the dequantized weights as wgmma's register A operand (A in shared memory,
# "ss", lost everywhere measured: git tag wgmma-ss-variant):
#   "rs"   two warpgroups (128 weight rows) that cp.async their own ring and meet at a block barrier
#          every k-tile;
#   "ws"   the same two warpgroups fed by a producer warpgroup's bulk copies (TMA) through mbarriers,
#          x laid out beforehand in the slots' order (x_tiles);
#   "ws4"  ws with four consumer warpgroups (256 weight rows): each x tile read from L2 serves twice the
#          rows; token tiles of 32 and 64 only.
KINDS = ("rs", "ws", "ws4")
BM = {"rs": 128, "ws": 128, "ws4": 256}  # weight rows per block
THREADS = {"rs": 256, "ws": 384, "ws4": 640}
BITS = {"rs": (4,), "ws": (4, 8), "ws4": (4, 8)}  # the weight widths each variant instantiates
KIND_TILES = {"rs": TILES, "ws": TILES, "ws4": (32, 64)}
# the ring's depth per token tile (WGMMA_TILES, WS_TILES in the .cu), per variant and weight width
STAGES = {("rs", 4): {32: 6, 64: 6, 128: 4, 256: 4},
          ("ws", 4): {32: 8, 64: 8, 128: 8, 256: 5},
          ("ws", 8): {32: 8, 64: 6, 128: 8, 256: 5},
          ("ws4", 4): {32: 8, 64: 8},
          ("ws4", 8): {32: 8, 64: 8}}
_T = {torch.float16: "f16", torch.bfloat16: "bf16"}


def module_of(kind: str) -> str:
    return MODULE if kind == "rs" else MODULE_WS


def wgmma_kernel(kind: str, dtype: torch.dtype, asym: bool, bn: int, bits: int = 4) -> str:
    stages = STAGES[kind, bits][bn]
    return f"int_weight_wgmma_{kind}_{_T[dtype]}_b{bits}_{'asym' if asym else 'sym'}_bn{bn}_s{stages}"


def shared_bytes(kind: str, bn: int, asym: bool, bits: int = 4) -> int:
    """Dynamic shared memory of one block (SmemRS / SmemWS in the .cu): a ring of STAGES slots of x,
    packed weights and scales (and zeros), and 1 KB to align the swizzled tiles."""
    tables = 2 if asym else 1
    if kind != "rs":
        row_blocks = BM[kind] // 32
        stage = bn * BK * 2 + row_blocks * 2 * bits // 4 * 512 + row_blocks * 2 * 64 * tables
    else:
        stage = bn * BK * 2 + 256 * 16 + 256 * 8 * tables
    return 1024 + STAGES[kind, bits][bn] * stage


def _ptr(t: torch.Tensor | None):
    return np.uint64(0) if t is None else t


def int_weight_wgmma(kernel: str, grid: tuple[int, int, int], *, x: torch.Tensor, w: torch.Tensor,
                     scales: torch.Tensor, zeros: torch.Tensor | None, bias: torch.Tensor | None, y: torch.Tensor,
                     ws: torch.Tensor | None, counters: torch.Tensor, M: int, N: int, K: int, RB: int, KS: int,
                     ldx: int, ldy: int, tr: int, sshift: int, sps: int, kt_per_split: int, shared_mem: int) -> None:
    """y [M, N] = x [M, K] @ dequant(W)^T (+ bias), 4-bit W, on wgmma.

    kernel     wgmma_kernel(...)
    grid       (ceil(RB / 4), splits, ceil(M / BN)): row tile of 128, K split, token tile
    x          T [M, ldx], rows 16-byte aligned, unit column stride, K a multiple of 8 (act-order:
               columns already in the weight's sorted order), permuted within each 32-column unit into
               the A fragment's order (fragment_order); columns past K read as zeros
    w          int32 [RB, KS, 1, 32, 4], the repacked words (quantkit.kernels.int_weight_layout)
    scales     T [RB, TR, SPS, 8, 4]; zeros: the same (asymmetric) or None
    bias       T [N] or None
    y          T [M, ldy], written
    ws         float32 [splits, M, 128 * grid[0]]: the splits' partial sums, None with one split
    counters   int32 [>= grid[0] * grid[2]], zero (the last block of a tile resets its own)
    KS         32-column units per row (a multiple of 4)
    kt_per_split  k-tiles per split
    shared_mem shared_bytes(kind, BN, asym)
    """
    cuda.launch(kernel, MODULE, grid, (THREADS["rs"],),
                (x, w, scales, _ptr(zeros), _ptr(bias), y, _ptr(ws), counters, np.int32(M), np.int32(N), np.int32(K),
                 np.int32(RB), np.int32(KS), np.int32(ldx), np.int32(ldy), np.int32(tr), np.int32(sshift),
                 np.int32(sps), np.int32(kt_per_split)),
                shared_mem=shared_mem)


def fragment_order(x2: torch.Tensor) -> torch.Tensor:
    """x [M, 32 KS] with each 32-column unit's columns in the order the "rs" kernel's K runs: column
    16 h + 8 hc + 2 t + c of a unit is column 8 t + 4 h + 2 hc + c of x (the repacked words' A
    fragments, quantkit.kernels.int_weight_layout). One copy."""
    m, kp = x2.shape
    return x2.view(m, kp // 32, 4, 2, 2, 2).permute(0, 1, 3, 4, 2, 5).reshape(m, kp)


def x_tiles(x: torch.Tensor, K: int, KS: int, bn: int) -> torch.Tensor:
    """x [M, ldx] (rows 16-byte aligned, unit column stride, K a multiple of 8) as the "ws" kernel's
    slots take it: T [ceil(M / bn), KS / 2, bn, 64], each k-tile of a token tile in fragment order and
    the 128-byte swizzle, zeros past M and K (csrc/int_weight_wgmma_ws.cu, wgmma_x_tiles). One kernel."""
    m = x.shape[0]
    mp = -(-m // bn) * bn
    xt = torch.empty(mp // bn, KS // 2, bn, BK, dtype=x.dtype, device=x.device)
    threads = mp * KS
    cuda.launch(f"wgmma_x_tiles_{_T[x.dtype]}_bn{bn}", MODULE_WS, (-(-threads // 256),), (256,),
                (x, xt, np.int32(m), np.int32(K), np.int32(KS), np.int32(x.stride(0)), np.int32(mp)))
    return xt


def x_tiles_reference(x: torch.Tensor, K: int, KS: int, bn: int) -> torch.Tensor:
    """x_tiles in torch ops (any device): the same layout, for tests."""
    m = x.shape[0]
    mp, kt = -(-m // bn) * bn, KS // 2
    xp = torch.zeros(mp, KS * 32, dtype=x.dtype, device=x.device)
    xp[:m, :K] = x[:, :K]
    chunks = fragment_order(xp).view(mp // bn, bn, kt, 8, 8).transpose(1, 2)  # [tile, k-tile, token, chunk, 8]
    n = torch.arange(bn, device=x.device)[:, None]
    swizzle = torch.arange(8, device=x.device)[None, :] ^ (n & 7)  # physical chunk p holds chunk p ^ (n & 7)
    return chunks[:, :, n, swizzle].reshape(mp // bn, kt, bn, BK)


def int_weight_wgmma_ws(kernel: str, grid: tuple[int, int, int], *, xt: torch.Tensor, w: torch.Tensor,
                        scales: torch.Tensor, zeros: torch.Tensor | None, bias: torch.Tensor | None, y: torch.Tensor,
                        ws: torch.Tensor | None, counters: torch.Tensor, M: int, N: int, RB: int, KS: int, ldy: int,
                        tr: int, sshift: int, sps: int, kt_per_split: int, shared_mem: int) -> None:
    """The "ws" and "ws4" variants of int_weight_wgmma: the same weights, tables and outputs, the grid's
    row tiles of BM[kind] rows; x as x_tiles lays it out (xt)."""
    kind = kernel.split("_")[3]  # int_weight_wgmma_<kind>_... (wgmma_kernel)
    cuda.launch(kernel, MODULE_WS, grid, (THREADS[kind],),
                (xt, w, scales, _ptr(zeros), _ptr(bias), y, _ptr(ws), counters, np.int32(M), np.int32(N),
                 np.int32(RB), np.int32(KS), np.int32(ldy), np.int32(tr), np.int32(sshift), np.int32(sps),
                 np.int32(kt_per_split)),
                shared_mem=shared_mem)
