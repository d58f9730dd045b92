"""Launches of csrc/quantize_rows.cu: per-token activation quantization (W8A8's dynamic inputs)."""

from __future__ import annotations

import numpy as np
import torch

from quantkit.kernels import cuda

MODULE = "quantize_rows"
_T = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_Q = {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}


def quantize_rows(grid: tuple[int, ...], block: tuple[int, ...], *, x: torch.Tensor, ld: int, q: torch.Tensor,
                  s: torch.Tensor, K: int) -> None:
    """Each row of x: s = absmax / 127.5 (int8) or / 448 (fp8), q = the row quantized with it,
    as quantkit.formats.activation computes them. The kernel: quantize_rows_<q type>_<x type>.

    grid       (rows,): one block per row
    block      (threads,): a multiple of 32, at most 1024
    x          float32 / float16 / bfloat16 [rows, ld], unit column stride
    ld         x's row stride in elements (a C long)
    q          int8 or float8_e4m3fn [rows, K], contiguous, written
    s          float32 [rows, 1], written: the rows' scales
    K          the row width
    """
    cuda.launch(f"quantize_rows_{_Q[q.dtype]}_{_T[x.dtype]}", MODULE, grid, block,
                (x, np.int64(ld), q, s, np.int32(K)))
