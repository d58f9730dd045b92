"""Whether a tensor holds NaN or Inf: one cheap test for every place that refuses them."""

from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """True when no element of `t` is NaN or Inf (integer tensors always are).

    Wide floats: one reduction without a copy, since a NaN or an Inf anywhere
    makes the min or the max non-finite (a 1 GB embedding is not duplicated). FP8 E4M3FN has no reductions and no Inf; its NaN is the bit
    pattern S.1111.111, tested on the raw bytes without a widened copy.
    """
    if not t.is_floating_point() or not t.numel():
        return True
    if t.dtype == torch.float8_e4m3fn:
        return not bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.float()  # other narrow floats: widened
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))
