"""The "cuda" backend of op "gptq_columns" (quantkit.kernels.gptq_columns): csrc/gptq_columns.cu, integer
formats on a GPU, one launch per range of columns instead of a few small kernels per column."""

from __future__ import annotations

import torch

from quantkit.formats import IntSpec
from quantkit.kernels import cuda
from quantkit.kernels import gptq_columns as op
from quantkit.kernels import launch_gptq_columns as launch
from quantkit.kernels.registry import register_backend

THREADS = 32  # rows per block: small blocks spread a few thousand rows over every multiprocessor
SHARED_LIMIT = 48 * 1024  # a block's columns of its rows in shared memory: B * THREADS * 4 bytes


def _available(device: torch.device, dtype: torch.dtype | None, spec: object) -> bool:
    return device.type == "cuda" and dtype == torch.float32 and isinstance(spec, IntSpec) and cuda.available()


@register_backend("gptq_columns", "cuda", available=_available)
def _gptq_columns(W1: torch.Tensor, Q1: torch.Tensor, E1: torch.Tensor, U1: torch.Tensor, s_rows: torch.Tensor,
                  z_rows: torch.Tensor, groups: torch.Tensor, c0: int, c1: int, spec: IntSpec) -> None:
    B, out = W1.shape
    shared = B * THREADS * 4
    tensors = (W1, Q1, E1, s_rows, z_rows)
    if shared > SHARED_LIMIT or any(not t.is_contiguous() for t in tensors) or U1.stride(1) != 1:
        return op.gptq_columns_reference(W1, Q1, E1, U1, s_rows, z_rows, groups, c0, c1, spec)
    launch.gptq_columns((-(-out // THREADS),), (THREADS,), W1=W1, Q1=Q1, E1=E1, U1=U1, ldu=U1.stride(0),
                        s_rows=s_rows, z_rows=z_rows, groups=groups.to(torch.int32).contiguous(), out=out, B=B,
                        c0=c0, c1=c1, symmetric=spec.symmetric, qmin=spec.qmin, qmax=spec.qmax, shared_mem=shared)
