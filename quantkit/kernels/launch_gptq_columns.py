"""Launches of csrc/gptq_columns.cu: GPTQ's column loop over one lazy block, every row in one launch."""

from __future__ import annotations

import numpy as np
import torch

from quantkit.kernels import cuda

MODULE = "gptq_columns"


def gptq_columns(grid: tuple[int, ...], block: tuple[int, ...], *, W1: torch.Tensor, Q1: torch.Tensor,
                 E1: torch.Tensor, U1: torch.Tensor, ldu: int, s_rows: torch.Tensor, z_rows: torch.Tensor,
                 groups: torch.Tensor, out: int, B: int, c0: int, c1: int, symmetric: bool, qmin: float,
                 qmax: float, shared_mem: int) -> None:
    """Columns c0..c1-1 of one block rounded for every output row; later columns take their errors.

    grid       (ceil(out / threads),): one thread per output row
    block      (threads,): a multiple of 32
    W1         float32 [B, out], contiguous: the block's columns (transposed weight), updated in place
    Q1, E1     float32 [B, out], contiguous: rows c0..c1-1 written (integer values; scaled errors)
    U1         float32 [B, B], row stride ldu, unit column stride: the block of the inverse Hessian's
               upper Cholesky factor
    ldu        U1's row stride in elements (a C long)
    s_rows     float32 [n_groups, out], contiguous: each group's scales, per output row
    z_rows     float32 [n_groups, out], contiguous: zero points (read only when not symmetric)
    groups     int32 [B], contiguous: each column's group (a row of s_rows / z_rows)
    out, B     output rows, columns in the block
    c0, c1     the columns to round, 0 <= c0 < c1 <= B
    symmetric  zero points are all zero (not read)
    qmin, qmax the integer range
    shared_mem B * threads * 4 bytes (at most 48 KB)
    """
    cuda.launch("gptq_columns", MODULE, grid, block,
                (W1, Q1, E1, U1, np.int64(ldu), s_rows, z_rows, groups, np.int32(out), np.int32(B), np.int32(c0),
                 np.int32(c1), np.int32(symmetric), np.float32(qmin), np.float32(qmax)), shared_mem=shared_mem)
