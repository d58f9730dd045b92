"""GPTQ's column loop over one lazy block of columns (quantkit.algorithms.gptq_math), as an op.

    gptq_columns(W1, Q1, E1, U1, s_rows, z_rows, groups, c0, c1, spec)

rounds columns c0..c1-1 of a block for every output row and pushes each column's scaled error
onto the block's later columns (Alg. 1 of Frantar et al. 2022, the Cholesky form):

    q      = clamp(round(w_i / s + z), qmin, qmax)      (FP8: e4m3(clamp(w_i / s)))
    e      = (w_i - (q - z) * s) / U1[i, i]
    w_k   -= U1[i, k] * e                               for i < k < B

All float32, the weight transposed (a column of W is a row here): W1, Q1, E1 [B, out]; U1 [B, B];
s_rows, z_rows [n_groups, out]; groups [B] the group of each column. W1 is updated in place, Q1
and E1's rows c0..c1-1 written. Quantization parameters computed from updated columns are the
caller's, between calls.

Backends (quantkit.kernels.registry, op "gptq_columns"):
    reference   torch, any device: a Python loop over the columns, a few small kernels each
    cuda        csrc/gptq_columns.cu (integer formats on a GPU): one launch for the whole
                range, one thread per output row (quantkit.kernels.gptq_columns_cuda)

QUANTKIT_GPTQ_COLUMNS=reference forces the twin (benchmarks compare the two).
"""

from __future__ import annotations

import contextlib
import os

import torch

from quantkit.formats import FloatSpec, IntSpec
from quantkit.formats.activation import FP8_E4M3_MAX
from quantkit.kernels import registry
from quantkit.kernels.registry import register_backend

OVERRIDE_VARIABLE = "QUANTKIT_GPTQ_COLUMNS"


def gptq_columns(W1: torch.Tensor, Q1: torch.Tensor, E1: torch.Tensor, U1: torch.Tensor, s_rows: torch.Tensor,
                 z_rows: torch.Tensor, groups: torch.Tensor, c0: int, c1: int, spec: IntSpec | FloatSpec,
                 override: str | None = None) -> None:
    """Columns c0..c1-1 rounded (see the module docstring), on the fastest backend that takes them."""
    override = override or os.environ.get(OVERRIDE_VARIABLE) or None
    chosen = registry.select_backend("gptq_columns", W1.device, W1.dtype, spec, override)
    chosen.run(W1, Q1, E1, U1, s_rows, z_rows, groups, c0, c1, spec)


@contextlib.contextmanager
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@register_backend("gptq_columns", "reference")
def gptq_columns_reference(W1: torch.Tensor, Q1: torch.Tensor, E1: torch.Tensor, U1: torch.Tensor,
                           s_rows: torch.Tensor, z_rows: torch.Tensor, groups: torch.Tensor, c0: int, c1: int,
                           spec: IntSpec | FloatSpec) -> None:
    fp8, symmetric = isinstance(spec, FloatSpec), spec.symmetric
    group_of = groups.tolist()
    diag = torch.diagonal(U1).tolist()
    with _single_thread():  # [out]-sized ops: threads only add hand-off latency
        for i in range(c0, c1):
            g = group_of[i]
            w, q, err = W1[i], Q1[i], E1[i]
            s, z = s_rows[g], z_rows[g]
            # q = clamp(round(w / s + z)); err = (w - (q - z) * s) / U1[i, i], in place
            torch.div(w, s, out=q)
            if not symmetric:
                q.add_(z)
            if fp8:
                q.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).copy_(q.to(torch.float8_e4m3fn))
            else:
                q.round_().clamp_(spec.qmin, spec.qmax)
            if symmetric:
                torch.mul(q, s, out=err)
            else:
                torch.sub(q, z, out=err).mul_(s)
            torch.sub(w, err, out=err).div_(diag[i])
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1.0)  # W1[k] -= U1[i, k] * err for k > i
