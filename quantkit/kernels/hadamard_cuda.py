"""The "cuda" backend of op "hadamard" (quantkit.kernels.hadamard): csrc/hadamard.cu's blockwise fast
Walsh-Hadamard transform for float32 / float16 / bfloat16 rows on a GPU."""

from __future__ import annotations

import math

import torch

from quantkit.formats.hadamard import rotate_blocks
from quantkit.kernels import cuda
from quantkit.kernels import launch_hadamard as launch
from quantkit.kernels.registry import register_backend

MAX_BLOCK = 8192  # the block in shared memory as float32: 32 KB
MAX_GRID_Y = 65535


def _available(device: torch.device, dtype: torch.dtype | None, block: object) -> bool:
    return (device.type == "cuda" and dtype in (torch.float32, torch.float16, torch.bfloat16) and cuda.available()
            and isinstance(block, int) and 2 <= block <= MAX_BLOCK and block & (block - 1) == 0)


@register_backend("hadamard", "cuda", available=_available)
def _hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    n = x.shape[-1]
    if n % block or x.numel() == 0:
        return rotate_blocks(x, block)  # its error says what is wrong with the shape
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    threads = min(256, block // 2)
    launch.hadamard_blocks((n // block, min(rows.shape[0], MAX_GRID_Y)), (threads,), x=rows, ldx=rows.stride(0), y=y,
                           ldy=n, rows=rows.shape[0], b=block, scale=1.0 / math.sqrt(block), shared_mem=block * 4)
    return y.reshape(x.shape)
