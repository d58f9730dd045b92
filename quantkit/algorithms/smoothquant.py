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
driver's folding step (quantkit.algorithms.folding) applies it; this module only observes and picks s.

A channel that never fires (max |x_j| = 0) or whose weights are all zero keeps
s_j = 1: there is nothing to balance, and a zero scale could not be folded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from quantkit.algorithms.base import Rounder, Scales, Transform, register, tie
from quantkit.algorithms.statistics import InputStatistics
from quantkit.formats import FloatSpec, IntSpec
from quantkit.formats.activation import ActSpec, fake_quantize, scale_for
from quantkit.formats.fake import fake_quantize_grouped
from quantkit.parsing import shown
from quantkit.recipe import Recipe, RecipeError

MAX_GRID = 1000  # grid points are searched one by one: beyond this a run never ends
MAX_SAMPLE_TOKENS = 2**31 - 1


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float,
                     tied: torch.Tensor | None = None) -> torch.Tensor:
    """s [in] for linears sharing one input; act_absmax [in] from calibration. tied: channels with
    one tied[c] share a scale, computed from their joint maxima (a channel of the op before that
    feeds several, as a value head feeds its query heads)."""
    a = tie(act_absmax.to(torch.float32), tied, "amax")
    w = tie(torch.stack([W.detach().abs().amax(dim=0).to(torch.float32) for W in weights]).amax(dim=0), tied, "amax")
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


def search_alpha(x: torch.Tensor, act_absmax: torch.Tensor, weights: list[torch.Tensor], specs: list[IntSpec | FloatSpec],
                 act: ActSpec, grid: int = 10, equalize: bool = True, tied: torch.Tensor | None = None,
                 held_absmax: torch.Tensor | None = None) -> tuple[float | None, torch.Tensor, float, float]:
    """The alpha in {0, 1/grid, ..., 1} (or None: no smoothing) whose smoothing gives the smallest output error
    of the quantized product Q(x / s) Q(W diag(s))^T against x W^T, on the sample
    tokens x [n, in]: activations per `act` (dynamic: per token; static: one scale
    from the calibration maxima, max_j act_absmax_j / s_j, as the driver will set
    it), weights per their spec. equalize: each token's error counts relative to
    its own output norm (every token has the same say, as GPTQ's equalize_tokens;
    otherwise the few attention-sink tokens with massive activations decide).
    tied: as smoothing_scales.

    held_absmax [in] (static inputs): the per-channel maxima of every calibration token but the
    sample's. The sample tokens are then scored as tokens the calibration never saw: each grid
    point's scales and static range come from held_absmax, so a range that fits the calibration
    tokens exactly (alpha near 1 flattens every channel to its own maximum) shows the saturation
    that unseen text meets. The scales returned are the chosen alpha's from act_absmax.
    Returns (alpha, s, its relative error, the error without smoothing)."""
    x = x.to(torch.float32)
    Ws = [W.detach().to(torch.float32) for W in weights]
    refs = [x @ W.T for W in Ws]
    norms = sum(r.pow(2).sum(dim=1) for r in refs)  # [tokens]: squared output norm of each token
    weight = 1.0 / norms.clamp_min(torch.finfo(torch.float32).tiny) if equalize else torch.ones_like(norms)
    weight = weight * (norms > 0)
    total = float((norms * weight).sum()) or 1.0

    held = act_absmax if held_absmax is None or act.dynamic else held_absmax

    def error(s: torch.Tensor) -> float:
        static = None if act.dynamic else scale_for((held.to(torch.float32) / s).amax(), act)
        xq = fake_quantize(x / s, act, static)
        return sum(float(((xq @ fake_quantize_grouped(W * s, spec).T - r).pow(2).sum(dim=1) * weight).sum())
                   for W, spec, r in zip(Ws, specs, refs)) / total

    ones = torch.ones_like(act_absmax, dtype=torch.float32)
    plain = error(ones)
    best = (None, plain)  # no smoothing is a candidate too: the search never does worse
    for k in range(grid + 1):
        alpha = k / grid
        e = error(smoothing_scales(held, Ws, alpha, tied))
        if e < best[1]:
            best = (alpha, e)
    s = ones if best[0] is None else smoothing_scales(act_absmax, Ws, best[0], tied)
    return best[0], s, best[1] ** 0.5, plain ** 0.5


@dataclass(frozen=True)
class SmoothQuantOptions:
    # migration strength in [0, 1], or "search": per mapping, the grid point whose
    # quantized product (inputs quantized as the recipe's scheme says) errs least on sample tokens
    alpha: float | Literal["search"] = 0.5
    sample_tokens: int = 1024  # calibration tokens kept per input for the search
    grid: int = 10
    equalize_tokens: bool = True  # the search weighs every token's error by its own output norm
    # static inputs: the search scores its sample against ranges the sample did not set (search_alpha's
    # held_absmax), as text the calibration never saw will meet them
    held_out_ranges: bool = True
    # under grouped-query attention, v -> o is smoothed with one scale per value channel, shared by the
    # query heads that read it (false: that mapping is skipped, as before)
    tie_heads: bool = True

    def __post_init__(self) -> None:
        if self.alpha != "search" and (isinstance(self.alpha, (bool, str)) or not 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1] or 'search', got {shown(self.alpha)}")
        if not 1 <= self.sample_tokens <= MAX_SAMPLE_TOKENS:
            raise ValueError(f"sample_tokens must be in 1..{MAX_SAMPLE_TOKENS}, got {shown(self.sample_tokens)}")
        if not 1 <= self.grid <= MAX_GRID:
            raise ValueError(f"grid must be in 1..{MAX_GRID}, got {shown(self.grid)}")


@register
class SmoothQuant(Transform):
    name = "smoothquant"
    Options = SmoothQuantOptions
    weight_specs = (IntSpec, FloatSpec)

    @property
    def ties_channels(self) -> bool:
        return self.options.tie_heads

    def __init__(self, options: SmoothQuantOptions, activations: ActSpec | None = None) -> None:
        super().__init__(options, activations)
        # per input group: per-channel max |x| and, for the alpha search, sample tokens
        self._stats = InputStatistics("SmoothQuant", absmax=True,
                                      sample_tokens=options.sample_tokens if options.alpha == "search" else 0)
        self._reports: dict[str, dict] = {}

    def check(self, recipe: Recipe) -> None:
        super().check(recipe)
        if recipe.activations is None:
            raise RecipeError(f"recipe {shown(recipe.name)}: {self.name} balances activation outliers for quantized "
                              f"activations, and scheme {recipe.scheme!r} keeps them in 16 bits; use a W8A8 "
                              f"scheme, or awq for weight-only schemes")

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        self._stats.observe(names, x)

    def propose_scales(self, names: list[str], weights: list[torch.Tensor], specs: list[IntSpec | FloatSpec],
                       rounder: Rounder | None, tied: torch.Tensor | None = None) -> Scales:
        group = self._stats[names[0]]
        absmax = group.absmax
        extra = {}
        if self.options.alpha == "search":
            alpha, s, err, plain = search_alpha(torch.cat(group.samples), absmax, weights, specs, self.activations,
                                                self.options.grid, self.options.equalize_tokens, tied,
                                                group.absmax_unsampled if self.options.held_out_ranges else None)
            extra = {"smooth_error": err, "smooth_error_unsmoothed": plain}
        else:
            alpha, s = self.options.alpha, smoothing_scales(absmax, weights, self.options.alpha, tied)
        for name in names:
            self._reports.setdefault(name, {}).update({
                "smooth_alpha": alpha, **extra,
                "act_outlier_ratio": outlier_ratio(absmax),  # before smoothing
                "act_outlier_ratio_smoothed": outlier_ratio(absmax / s),
            })
        return Scales(scales=s, alpha=alpha)

    def folded(self, names: list[str], s: torch.Tensor) -> None:
        self._stats.fold(names[0], s)

    def skipped(self, names: list[str], reason: str) -> None:
        for name in names:
            self._reports.setdefault(name, {})["smooth_skipped"] = reason

    def report(self, name: str) -> dict:
        return self._reports.get(name, {})

    def free(self, name: str) -> None:
        self._stats.free(name)
        self._reports.pop(name, None)

    @classmethod
    def summarize(cls, rows: list[dict]) -> list[tuple[str, str]]:
        smooth = [r for r in rows if "act_outlier_ratio" in r or "smooth_skipped" in r]
        if not smooth:
            return []
        done = [r for r in smooth if r.get("smooth_alpha") is not None]
        skipped = sorted({r["smooth_skipped"] for r in smooth if r.get("smooth_skipped")})
        worst = max((r["act_outlier_ratio"] for r in smooth if "act_outlier_ratio" in r), default=0.0)
        worst_after = max((r["act_outlier_ratio_smoothed"] for r in smooth if "act_outlier_ratio_smoothed" in r), default=0.0)
        return [("SmoothQuant", f"{len(done)} of {len(smooth)} linears smoothed; worst input outlier ratio "
                                f"{worst:.0f} -> {worst_after:.0f}" + (f"; skipped: {'; '.join(skipped)}" if skipped else ""))]
