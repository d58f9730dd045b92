"""AWQ as pure tensor functions (Lin et al. 2023, arXiv:2306.00978).

AWQ protects the weights that meet large activations by scaling input
channels before rounding: for linears W_i fed by one input x,

    y = W_i x = (W_i diag(s)) (diag(s)^-1 x)

so W_i diag(s) is what gets rounded, and diag(s)^-1 is folded into the op that
produced x (a norm's weight, or the rows of a previous linear), leaving the
float function unchanged. s comes from the per-channel activation magnitude
m_x (and, with duo scaling, the weights' magnitude m_w):

    s = m_x^a / m_w^(1 - a)     (duo)        s = m_x^a     (plain)

normalized to sqrt(max s * min s) = 1, with a chosen on a grid in [0, 1) to
minimize the linears' output error over the calibration tokens. Then each
group's clipping range is shrunk on a grid, again minimizing output error.

Output errors come from the Hessian H = 2/n X^T X the driver accumulates
anyway (GPTQ's), not from re-running forwards:

    sum over tokens of ||dW x||^2  =  n/2 * tr(dW H dW^T)

which makes each grid point one [out, in] x [in, in] product.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from quantkit.algorithms.base import Rounder
from quantkit.algorithms.statistics import scale_hessian
from quantkit.formats import IntSpec, compute_qparams, group_minmax
from quantkit.formats.fake import fake_quantize_grouped, round_trip


def output_error(dW: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per output row: dW_r H dW_r^T, for dW [out, in], H [in, in] -> [out]."""
    return ((dW @ H) * dW).sum(dim=1)


def candidate_scales(x_mag: torch.Tensor, w_mag: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Per-input-channel scales for one grid point; w_mag None = plain AWQ."""
    tiny = 1e-4
    s = x_mag.clamp_min(tiny).pow(alpha)
    if w_mag is not None:
        s = s / w_mag.clamp_min(tiny).pow(1 - alpha)
    s = s.clamp_min(tiny)
    return s / torch.sqrt(s.max() * s.min())


def weight_magnitude(weights: list[torch.Tensor], specs: list[IntSpec]) -> torch.Tensor:
    """Mean over output rows of |w| relative to its group's max |w|, per input channel."""
    parts = []
    for W, spec in zip(weights, specs):
        lo, hi = group_minmax(W.abs(), spec.group_size)
        gs = spec.group_size or W.shape[1]
        per_col = torch.repeat_interleave(hi, gs, dim=1)[:, : W.shape[1]]
        parts.append(W.abs() / per_col.clamp_min(1e-12))
    return torch.cat(parts).mean(dim=0)


@dataclass
class ScaleSearch:
    scales: torch.Tensor  # [in] float32; all ones when no grid point beat plain rounding
    alpha: float | None  # the chosen exponent (None: unscaled won)
    error: float  # relative output error at the chosen scales
    error_unscaled: float  # relative output error of the same rounding without scales (s = 1)


def search_scales(weights: list[torch.Tensor], H: torch.Tensor, x_mag: torch.Tensor, specs: IntSpec | list[IntSpec],
                  grid: int = 20, duo_scaling: bool = True, rounder: Rounder | None = None,
                  confirm: int = 2) -> ScaleSearch:
    """The grid search over alpha for linears sharing one input (and H);
    `specs`: one per weight, or one for all.

    Every grid point is scored with round-to-nearest (cheap: one broadcast and
    one product). A rounding that compensates errors (GPTQ) can make a
    different choice best, so with `rounder` the unscaled weights and the
    `confirm` best grid points are rounded by it and the lowest error wins:
    scaling is kept only where it helps the rounding that will actually run.
    """
    Ws = [W.to(torch.float32) for W in weights]
    specs = specs if isinstance(specs, list) else [specs] * len(Ws)
    H = H.to(torch.float32)
    total = sum(float(output_error(W, H).sum()) for W in Ws) or 1.0
    w_mag = weight_magnitude(Ws, specs) if duo_scaling else None

    def error(rounded: list[torch.Tensor], s: torch.Tensor) -> float:
        return sum(float(output_error(W - q / s, H).sum()) for W, q in zip(Ws, rounded)) / total

    def rtn_error(s: torch.Tensor) -> float:
        return error([fake_quantize_grouped(W * s, spec) for W, spec in zip(Ws, specs)], s)

    ones = torch.ones_like(x_mag, dtype=torch.float32)
    scored = [(rtn_error(ones), None, ones)]
    for k in range(grid):
        s = candidate_scales(x_mag.to(torch.float32), w_mag, k / grid)
        scored.append((rtn_error(s), k / grid, s))
    if rounder is not None:
        shortlist = [scored[0], *sorted(scored[1:], key=lambda c: c[0])[:confirm]]
        scored = [(error(rounder([W * s for W in Ws], scale_hessian(H, s), specs), s), alpha, s) for _, alpha, s in shortlist]
    e, alpha, s = min(scored, key=lambda c: c[0])  # the first of equals: unscaled wins ties
    return ScaleSearch(scales=s, alpha=alpha, error=max(e, 0.0) ** 0.5, error_unscaled=max(scored[0][0], 0.0) ** 0.5)


def search_clip(W: torch.Tensor, H: torch.Tensor, spec: IntSpec, grid: int = 20,
                max_shrink: float = 0.5) -> tuple[torch.Tensor, float]:
    """Shrink each (row, group)'s range on a grid to minimize that group's
    output error (dW_g H_gg dW_g^T; cross-group terms left out, as AWQ does).

    Returns W clamped to the chosen ranges (so any rounding that takes its
    ranges from the weights uses them) and the mean shrink factor. All whole
    groups are searched at once (one batched product per grid point); a
    partial last group on its own.
    """
    out_f, in_f = W.shape
    gs = spec.group_size or in_f
    Wf = W.to(torch.float32)
    H = H.to(torch.float32)
    one_group = dataclasses.replace(spec, group_size=None)
    ratios = [1 - max_shrink * k / grid for k in range(grid)]  # 1.0 down to (1 - max_shrink)
    full = in_f // gs
    spans = ([(0, full * gs, full)] if full else []) + ([(full * gs, in_f, 1)] if in_f % gs else [])
    out = Wf.clone()
    shrink_sum = 0.0
    for c0, c1, n_groups in spans:
        width = (c1 - c0) // n_groups
        Wg = Wf[:, c0:c1].reshape(out_f, n_groups, width)  # [out, G, gs]
        Hb = torch.stack([H[c0 + g * width : c0 + (g + 1) * width, c0 + g * width : c0 + (g + 1) * width]
                          for g in range(n_groups)])  # [G, gs, gs]
        lo, hi = Wg.amin(dim=2), Wg.amax(dim=2)  # [out, G]
        best_err = torch.full((out_f, n_groups), float("inf"), device=W.device)
        best_r = torch.ones(out_f, n_groups, device=W.device)
        for r in ratios:
            scale, zp = compute_qparams(lo * r, hi * r, one_group)
            deq = round_trip(Wg.clamp(lo[..., None] * r, hi[..., None] * r), scale, zp, one_group)
            d = (Wg - deq).transpose(0, 1)  # [G, out, gs]
            err = (torch.bmm(d, Hb) * d).sum(dim=2).T  # [out, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, torch.full_like(best_r, r), best_r)
        r3 = best_r[..., None]
        out[:, c0:c1] = Wg.clamp(lo[..., None] * r3, hi[..., None] * r3).reshape(out_f, c1 - c0)
        shrink_sum += float(best_r.sum()) * width
    return out.to(W.dtype), shrink_sum / (in_f * out_f)
