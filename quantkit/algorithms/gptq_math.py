"""GPTQ as pure tensor functions (Frantar et al. 2022, arXiv:2210.17323).

For a linear layer with weight W [out, in] and calibration inputs X [n, in],
GPTQ rounds W one input column at a time, minimizing the layer-output error
||W X^T - Q X^T||^2. Its Hessian is

    H = 2/n * X^T X                                        (in x in)

and after rounding column q the remaining columns F absorb the error
(Alg. 1 of the paper, with the Cholesky form of H^-1):

    err   = (w_q - quant(w_q)) / [H_F^-1]_qq
    W_F  -= err * [H_F^-1]_{q,F}

Columns are processed in blocks of B (lazy batch updates): within a block the
update touches only the block; the rest of W is updated once per block.
H itself is accumulated by quantkit.algorithms.statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.formats import FloatSpec, IntSpec, QuantizedWeight, compute_qparams, group_minmax, per_tensor, stored_scale_dtype
from quantkit.formats.fp8 import fp8_scale
from quantkit.kernels.gptq_columns import gptq_columns


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    row_loss: torch.Tensor  # [out] float64: per output row, sum over columns of (w - q)^2 / [H^-1]_qq^2 / 2
    loss: float  # row_loss summed: the paper's objective
    damping: float  # the dampening fraction that made H positive definite
    dead_columns: int  # inputs that never fired (diag(H) == 0): their weights are zeroed


def inverse_cholesky(H: torch.Tensor, dampening: float, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; damping grows 10x until it factors."""
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = dampening
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U, damp
        damp *= 10
    raise torch.linalg.LinAlgError(f"Hessian is not positive definite even with dampening {damp / 10:g}")


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: IntSpec | FloatSpec,
    dampening: float = 0.01,
    block_size: int = 128,
    actorder: str | None = None,
    static_groups: bool = False,
) -> GPTQResult:
    """GPTQ-round W [out, in] against Hessian H [in, in].

    A FloatSpec rounds each column to FP8 (E4M3) on the per-row or per-tensor
    scale of the original W, fixed up front; the error feedback is the same.

    actorder (compressed-tensors semantics):
      None     columns in their natural order
      "group"  columns in decreasing diag(H); groups are consecutive columns in
               that order, so the result carries g_idx
      "weight" columns in decreasing diag(H), groups stay the natural
               contiguous ones with qparams fixed up front (no g_idx)
    static_groups: fix every group's qparams from the original W up front
    (implied by actorder="weight"); otherwise a group's qparams come from its
    columns as updated by the errors of the groups before it.
    """
    if actorder not in (None, "group", "weight"):
        raise ValueError(f"actorder must be None, 'group' or 'weight', got {actorder!r}")
    out_f, in_f = W.shape
    store_dtype = W.dtype
    W = W.to(torch.float32).clone()
    H = H.to(torch.float32).clone()
    gs = spec.group_size if spec.group_size is not None else in_f

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    def qparams(cols: torch.Tensor):  # cols [out, c] -> scale, zero_point [out, 1] (scale as stored)
        lo, hi = cols.amin(dim=1, keepdim=True), cols.amax(dim=1, keepdim=True)
        scale, zp = compute_qparams(lo.to(store_dtype), hi.to(store_dtype), spec)
        return scale, zp

    fp8 = isinstance(spec, FloatSpec)
    fixed = static_groups or actorder == "weight" or spec.group_size is None
    if fp8:
        fixed_scale = fp8_scale(W.to(store_dtype), spec).expand(out_f, 1)
        fixed_zp = torch.zeros(out_f, 1, dtype=torch.int8, device=W.device)
    elif fixed:
        mins, maxs = group_minmax(W, spec.group_size)  # natural groups of the original W
        fixed_scale, fixed_zp = compute_qparams(mins.to(store_dtype), maxs.to(store_dtype), spec)

    perm = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U, damp = inverse_cholesky(H, dampening)

    n_groups = spec.num_groups(in_f)
    scales = torch.zeros(out_f, n_groups, dtype=stored_scale_dtype(spec, store_dtype), device=W.device)
    zps = torch.zeros(out_f, n_groups, dtype=torch.int8, device=W.device)
    # group of each processed column: natural group of the original column when
    # qparams are fixed up front, else its position in processing order // gs
    col_group = perm // gs if fixed else torch.arange(in_f, device=W.device) // gs
    if fixed:
        scales.copy_(fixed_scale)
        zps.copy_(fixed_zp)
    # working copies of the qparams, one contiguous row per group
    s_rows = scales.T.to(torch.float32).contiguous()  # [n_groups, out]
    z_rows = zps.T.to(torch.float32).contiguous()
    row_loss = torch.zeros(out_f, dtype=torch.float64, device=W.device)

    # Work on W^T [in, out]: a column of W is then a contiguous row, so the
    # per-column reads, writes and rank-1 updates touch memory in order.
    Wt = W.T.contiguous()
    # in processing order; FP8 values are kept as float32 (exact) until the end
    Qt = torch.zeros(in_f, out_f, dtype=torch.float32 if fp8 else torch.int8, device=W.device)
    group_of = col_group.to(torch.int32)  # each processed column's row of s_rows / z_rows
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = Wt[i1:i2].clone()  # [B, out], updated in place as columns are rounded
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        # runs of columns between group starts: a group's qparams come from its columns as
        # updated by everything before it, so they are computed between the runs
        starts = [] if fixed else [c for c in range(i1, i2) if c % gs == 0]
        cuts = sorted({i1, i2, *starts})
        for a, b in zip(cuts, cuts[1:]):
            if a in starts:
                g, stop = a // gs, min(a + gs, in_f)
                group_cols = torch.cat([W1[a - i1:], Wt[i2:stop]], dim=0)[: stop - a]
                sc, zp = qparams(group_cols.T)
                scales[:, g : g + 1], zps[:, g : g + 1] = sc, zp
                s_rows[g], z_rows[g] = sc[:, 0], zp[:, 0]
            gptq_columns(W1, Q1, Err1, U[i1:i2, i1:i2], s_rows, z_rows, group_of[i1:i2], a - i1, b - i1, spec)
        Qt[i1:i2] = Q1.to(Qt.dtype)
        row_loss += (Err1.double() ** 2).sum(dim=0) / 2
        Wt[i2:] -= U[i1:i2, i2:].T @ Err1

    Q = Qt.T
    inv = torch.argsort(perm)
    q_natural = Q[:, inv].contiguous()
    g_idx = None
    if fp8:  # one scale per row or tensor: the column order needs no record
        scale = scales[:1] if per_tensor(spec) else scales
        qw = QuantizedWeight(q=q_natural.to(torch.float8_e4m3fn), scale=scale.contiguous(),
                             zero_point=torch.zeros(scale.shape, dtype=torch.int8, device=W.device), spec=spec)
        return GPTQResult(weight=qw, row_loss=row_loss, loss=float(row_loss.sum()), damping=damp, dead_columns=int(dead.sum()))
    if actorder == "group":
        g_idx = col_group[inv].to(torch.int32)  # processed position // gs, per original column
    qw = QuantizedWeight(q=q_natural, scale=scales, zero_point=zps, spec=spec, g_idx=g_idx)
    return GPTQResult(weight=qw, row_loss=row_loss, loss=float(row_loss.sum()), damping=damp, dead_columns=int(dead.sum()))
