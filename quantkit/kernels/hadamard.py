"""The online rotation of rotate-online checkpoints as an op: x [..., n] times the block-diagonal
matrix of n / block Sylvester Hadamard matrices of order `block`, each scaled by 1/sqrt(block)
(compressed-tensors' "hadamard" transform; quantkit.formats.hadamard).

Backends (quantkit.kernels.registry, op "hadamard"):
    reference   quantkit.formats.hadamard.rotate_blocks: the dense block matrix, float32
    cuda        csrc/hadamard.cu: a fast Walsh-Hadamard transform, block log2(block) additions
                a row block instead of block^2 multiply-adds (quantkit.kernels.hadamard_cuda)
"""

from __future__ import annotations

import torch

from quantkit.formats.hadamard import rotate_blocks
from quantkit.kernels import registry
from quantkit.kernels.registry import register_backend


def hadamard_rows(x: torch.Tensor, block: int, override: str | None = None) -> torch.Tensor:
    """rotate_blocks(x, block) on the fastest backend that takes it; same shape and dtype as x."""
    return registry.select_backend("hadamard", x.device, x.dtype, block, override).run(x, block)


register_backend("hadamard", "reference")(rotate_blocks)
