"""Launches of csrc/scale_epilogue.cu: the int8 GEMM's output scaled (W8A8 INT8) in one pass."""

from __future__ import annotations

import numpy as np
import torch

from quantkit.kernels import cuda

MODULE = "scale_epilogue"
_T = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def scale_epilogue(grid: tuple[int, ...], block: tuple[int, ...], *, acc: torch.Tensor, lda: int, sx: torch.Tensor,
                   sw: torch.Tensor, bias: torch.Tensor, has_bias: bool, out: torch.Tensor, M: int, N: int) -> None:
    """out = T(float(acc) * sx[m] * sw[n] (+ bias[n])), float32 products in that order. The kernel:
    scale_epilogue_<T>, T = out's dtype (float32 / float16 / bfloat16).

    grid       (min(ceil(M * N / 256), 65535),): a grid-stride loop over the elements; block (256,)
    acc        int32 [M, lda], unit column stride: the int8 GEMM's sums
    lda        acc's row stride in elements (a C long)
    sx         float32 [M], contiguous: the tokens' scales
    sw         float32 [N], contiguous: the weight rows' scales
    bias       float32 [N], contiguous; read only when has_bias (any valid pointer otherwise)
    has_bias   whether to add bias
    out        T [M, N], contiguous, written
    M, N       tokens, output features
    """
    cuda.launch(f"scale_epilogue_{_T[out.dtype]}", MODULE, grid, block,
                (acc, np.int64(lda), sx, sw, bias, np.int32(has_bias), out, np.int32(M), np.int32(N)))
