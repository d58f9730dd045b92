"""SmoothQuant (Xiao et al. 2022, arXiv:2211.10438): move activation outliers into the weights.

Activations of LLMs have a few input channels with maxima far above the rest,
which ruins a per-token or per-tensor activation scale. For linears W_i fed by
one input x, SmoothQuant divides channel j of x by

    s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)     (max over tokens / over every output row of every W_i)

and multiplies column j of each W_i by s_j: the same product, flatter
activations, slightly rougher weights. alpha (migration strength, 0.5 by
default) moves more of the difficulty into the weights as it grows. The
division is folded into the op before (a norm's weight, or a previous linear's
rows) through the model family's mapping table, exactly as AWQ's scales are: the
driver's transform step does the folding; this module only observes and picks s.

A channel that never fires (max |x_j| = 0) or whose weights are all zero keeps
s_j = 1: there is nothing to balance, and a zero scale could not be folded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.algorithms.base import Algorithm, register
from quantkit.formats import IntSpec


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] for linears sharing one input; act_absmax [in] from calibration."""
    a = act_absmax.to(torch.float32)
    w = torch.stack([W.detach().abs().amax(dim=0).to(torch.float32) for W in weights]).amax(dim=0)
    if not (torch.isfinite(a).all() and torch.isfinite(w).all()):
        raise ValueError("SmoothQuant: activation or weight maxima are not finite")
    live = (a > 0) & (w > 0)
    s = torch.ones_like(a)
    s[live] = a[live].pow(alpha) / w[live].pow(1 - alpha)
    return s


def outlier_ratio(absmax: torch.Tensor) -> float:
    """max over channels / median over channels of per-channel |x| maxima: how much
    one outlier channel stretches a per-token or per-tensor scale."""
    absmax = absmax.to(torch.float32)
    median = float(absmax.median())
    return float(absmax.max()) / median if median > 0 else float("inf")


@dataclass
class Smoothing:
    scales: torch.Tensor
    alpha: float  # never None: smoothing always applies (the driver folds it)


@dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float = 0.5  # migration strength in [0, 1]

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


@register
class SmoothQuant(Algorithm):
    name = "smoothquant"
    Options = SmoothQuantOptions
    needs_activations = True
    rounds = False
    transforms = True

    def __init__(self, options: SmoothQuantOptions) -> None:
        super().__init__(options)
        self._absmax: dict[str, list[torch.Tensor]] = {}  # name -> [per-channel max |x|], shared by one input's linears
        self._reports: dict[str, dict] = {}

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        batch_max = x.detach().abs().amax(dim=0).to(torch.float32)
        if not torch.isfinite(batch_max).all():
            raise ValueError(f"SmoothQuant: the calibration input of {names[0]} is not finite")
        entry = self._absmax.get(names[0])
        if entry is None:
            entry = [batch_max]
            for name in names:
                self._absmax[name] = entry
        else:
            torch.maximum(entry[0], batch_max, out=entry[0])

    def search_scales(self, names: list[str], weights: list[torch.Tensor], specs: list[IntSpec], rounder=None) -> Smoothing:
        if names[0] not in self._absmax:
            raise RuntimeError(f"SmoothQuant saw no calibration input for {names[0]}")
        absmax = self._absmax[names[0]][0]
        s = smoothing_scales(absmax, weights, self.options.alpha)
        for name in names:
            self._reports.setdefault(name, {}).update({
                "smooth_alpha": self.options.alpha,
                "act_outlier_ratio": outlier_ratio(absmax),  # before smoothing
                "act_outlier_ratio_smoothed": outlier_ratio(absmax / s),
            })
        return Smoothing(scales=s, alpha=self.options.alpha)

    def scaled(self, names: list[str], s: torch.Tensor) -> None:
        entry = self._absmax[names[0]]
        entry[0] = entry[0] / s.to(entry[0].device)

    def skip(self, names: list[str], reason: str) -> None:
        for name in names:
            self._reports.setdefault(name, {})["smooth_skipped"] = reason

    def layer_report(self, name: str) -> dict:
        return self._reports.get(name, {})

    def free(self, name: str) -> None:
        self._absmax.pop(name, None)
        self._reports.pop(name, None)
