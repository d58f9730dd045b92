"""Each column's group's scale and zero point applied to a weight: `quantize` and `dequantize`.

The per-group arithmetic of the integer formats (the conventions are in
quantkit.formats.qparams). It sits below both the quantized-weight record
(quantkit.formats.weight, whose `dequantize()` runs it) and the round-to-nearest
code (quantkit.formats.qparams), so that neither has to import the other.
"""

from __future__ import annotations

import torch

from quantkit.formats.spec import IntSpec


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16/fp16 -> float32; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def check_finite(t: torch.Tensor, what: str) -> None:
    # one reduction: a NaN or an Inf anywhere makes max |t| non-finite
    if t.numel() and not torch.isfinite(t.abs().amax()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise ValueError(f"{what} {tuple(t.shape)} has {n_nan} NaN and {n_inf} Inf values")


def _expand_groups(t: torch.Tensor, n_in: int, spec: IntSpec, g_idx: torch.Tensor) -> torch.Tensor:
    """Per-group values t [out, n_groups] -> per-column values [out, n_in] through g_idx."""
    if tuple(g_idx.shape) != (n_in,):
        raise ValueError(f"g_idx must have shape ({n_in},), got {tuple(g_idx.shape)}")
    if g_idx.is_floating_point():
        raise ValueError(f"g_idx must be an integer tensor, got {g_idx.dtype}")
    if n_in and (int(g_idx.min()) < 0 or int(g_idx.max()) >= t.shape[1]):
        raise ValueError(
            f"g_idx values must lie in [0, {t.shape[1]}), got [{int(g_idx.min())}, {int(g_idx.max())}]"
        )
    return t[:, g_idx.long()]


def _apply_grouped(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: IntSpec, fn) -> torch.Tensor:
    """fn(x_group, s, z) over contiguous column groups, without materializing
    per-column s and z: x [out, in] is viewed (zero-padded when the last group
    is partial) as [out, G, gs] against s, z [out, G, 1]."""
    n_out, n_in = x.shape
    g = s.shape[1]
    gs = spec.group_size if spec.group_size is not None else n_in
    if g != spec.num_groups(n_in):
        raise ValueError(f"qparams have {g} groups but {spec} on {n_in} columns needs {spec.num_groups(n_in)}")
    xg = torch.nn.functional.pad(x, (0, g * gs - n_in)) if g * gs != n_in else x
    out = fn(xg.reshape(n_out, g, gs), s[..., None], z[..., None])  # [out, G, gs]
    return out.reshape(n_out, g * gs)[:, :n_in]


def _check_qparams(n_out: int, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    if scale.ndim != 2 or scale.shape[0] != n_out or not scale.is_floating_point():
        raise ValueError(f"scale must be float [{n_out}, n_groups], got {scale.dtype} {tuple(scale.shape)}")
    if zero_point.shape != scale.shape or zero_point.is_floating_point():
        raise ValueError(
            f"zero_point must be an integer tensor of shape {tuple(scale.shape)}, "
            f"got {zero_point.dtype} {tuple(zero_point.shape)}"
        )


def quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: IntSpec,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """q = clamp(round(w / s + z), qmin, qmax) with each column's group's (s, z).

    w [out, in] float, scale/zero_point [out, n_groups], g_idx [in] or None
    (column // group_size) -> q int8 [out, in]. To quantize a slice of columns
    (GPTQ), pass the matching slice of g_idx. Rounding is half to even, applied
    after adding z, as compressed-tensors does.
    """
    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    check_finite(w, "weight")
    _check_qparams(w.shape[0], scale, zero_point)
    cdt = compute_dtype(w.dtype)

    def rounded(x, s, z):
        return torch.round(x / s + z).clamp_(spec.qmin, spec.qmax)

    if g_idx is None:  # the stored scale, widened exactly
        q = _apply_grouped(w.to(cdt), scale.to(cdt), zero_point.to(cdt), spec, rounded)
    else:
        n_in = w.shape[1]
        q = rounded(w.to(cdt), _expand_groups(scale.to(cdt), n_in, spec, g_idx), _expand_groups(zero_point.to(cdt), n_in, spec, g_idx))
    return q.to(torch.int8)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: IntSpec,
    g_idx: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """w' = (q - z) * s, computed in float32 and cast to `dtype` (default: scale's dtype).

    q int8 [out, in], scale/zero_point [out, n_groups] -> [out, in]. (q - z) * s is
    exact in float32 for bf16/fp16 scales, so the result equals computing in the
    scale's own dtype.
    """
    if q.ndim != 2 or q.dtype != torch.int8:
        raise ValueError(f"q must be a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    _check_qparams(q.shape[0], scale, zero_point)
    dtype = scale.dtype if dtype is None else dtype
    cdt = compute_dtype(scale.dtype)

    def scaled(x, s, z):
        return (x - z) * s

    if g_idx is None:
        w = _apply_grouped(q.to(cdt), scale.to(cdt), zero_point.to(cdt), spec, scaled)
    else:
        n_in = q.shape[1]
        w = scaled(q.to(cdt), _expand_groups(scale.to(cdt), n_in, spec, g_idx), _expand_groups(zero_point.to(cdt), n_in, spec, g_idx))
    return w.to(dtype)
