"""Launches of csrc/hadamard.cu: the online rotation's blockwise Walsh-Hadamard transform."""

from __future__ import annotations

import numpy as np
import torch

from quantkit.kernels import cuda

MODULE = "hadamard"
_T = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def hadamard_blocks(grid: tuple[int, ...], block: tuple[int, ...], *, x: torch.Tensor, ldx: int, y: torch.Tensor,
                    ldy: int, rows: int, b: int, scale: float, shared_mem: int) -> None:
    """Each block of b columns of each row of x times H_b * scale, into y. The kernel:
    hadamard_blocks_<T>, T = x's dtype (float32 / float16 / bfloat16; y's too).

    grid       (n / b, min(rows, 65535)): a column block, rows in a grid-stride loop
    block      (threads,): a power of two, at most b / 2
    x          T [rows, ldx], unit column stride
    ldx        x's row stride in elements (a C long)
    y          T [rows, ldy], unit column stride, written (may be x)
    ldy        y's row stride in elements (a C long)
    rows       rows of x and y
    b          the block: a power of two, at least 2
    scale      1 / sqrt(b) for an orthogonal rotation
    shared_mem b * 4 bytes
    """
    cuda.launch(f"hadamard_blocks_{_T[x.dtype]}", MODULE, grid, block,
                (x, np.int64(ldx), y, np.int64(ldy), np.int32(rows), np.int32(b), np.float32(scale)),
                shared_mem=shared_mem)
