"""AWQ driven by the block-by-block pipeline (math in awq_math.py).

AWQ does not round: it rescales input channels (folding the inverse scales
into the op before, as the family's mappings say) and clips each group's range,
then the recipe's rounding step (rtn or gptq) rounds the transformed weights.
The driver calls, per block: observe (one pass over the float block), then
propose_scales / folded for each mapping it can fold, then clip per linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.algorithms.awq_math import output_error, search_clip, search_scales
from quantkit.algorithms.base import Rounder, Scales, Transform, register
from quantkit.algorithms.statistics import InputStatistics
from quantkit.formats import IntSpec
from quantkit.parsing import shown

MAX_GRID = 1000  # grid points are searched one by one: beyond this a run never ends


@dataclass(frozen=True)
class AWQOptions:
    grid: int = 20  # alpha in {0, 1/grid, ..., (grid-1)/grid}
    duo_scaling: bool = True  # s = m_x^a / m_w^(1-a); false: s = m_x^a
    clip: bool = True  # per-group range shrinking after scaling
    clip_grid: int = 20
    max_shrink: float = 0.5  # ranges shrink down to (1 - max_shrink) of the original
    # every calibration token weighs the same in the error the searches
    # minimize (as GPTQ's equalize_tokens); the activation magnitudes: equalize_magnitudes
    equalize_tokens: bool = True
    # the activation magnitudes m_x from unit token rows too, so that a few large
    # tokens (or one domain of a mix with larger activations) do not set them
    equalize_magnitudes: bool = False

    def __post_init__(self) -> None:
        for key in ("grid", "clip_grid"):
            if not 1 <= getattr(self, key) <= MAX_GRID:
                raise ValueError(f"{key} must be in 1..{MAX_GRID}, got {shown(getattr(self, key))}")
        if not 0 < self.max_shrink < 1:  # NaN fails too
            raise ValueError(f"max_shrink must be in (0, 1), got {self.max_shrink}")


@register
class AWQ(Transform):
    name = "awq"
    Options = AWQOptions

    def __init__(self, options: AWQOptions, activations=None) -> None:
        super().__init__(options, activations)
        # per input group: H (rows equalized as asked) and the mean |x| per channel
        self._stats = InputStatistics("AWQ", hessian=True, equalize=options.equalize_tokens, abs_mean=True,
                                      equalize_abs_mean=options.equalize_magnitudes)
        self._reports: dict[str, dict] = {}

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        self._stats.observe(names, x)

    def propose_scales(self, names: list[str], weights: list[torch.Tensor], specs: list[IntSpec],
                       rounder: Rounder | None, tied: torch.Tensor | None = None) -> Scales:
        group = self._stats[names[0]]
        found = search_scales(weights, group.hessian, group.abs_mean, specs, self.options.grid, self.options.duo_scaling,
                              rounder)
        for name in names:
            self._reports.setdefault(name, {}).update({
                "awq_alpha": found.alpha,  # None: the unscaled weights rounded best
                "awq_error": found.error,
                "awq_error_unscaled": found.error_unscaled,
            })
        return Scales(found.scales, found.alpha)

    def folded(self, names: list[str], s: torch.Tensor) -> None:
        self._stats.fold(names[0], s)

    def skipped(self, names: list[str], reason: str) -> None:
        for name in names:
            self._reports.setdefault(name, {})["awq_skipped"] = reason

    def clip(self, name: str, weight: torch.Tensor, spec: IntSpec, rounder: Rounder | None) -> torch.Tensor:
        """The clip search (scored with round-to-nearest); with `rounder`, the
        clipped weight is kept only if that rounding does better with it."""
        if not self.options.clip:
            return weight
        H = self._stats[name].hessian
        clipped, shrink = search_clip(weight, H, spec, self.options.clip_grid, self.options.max_shrink)
        report = self._reports.setdefault(name, {})
        if rounder is not None:
            W = weight.to(torch.float32)
            plain, tried = rounder([W, clipped.to(torch.float32)], H, [spec, spec])  # one solve for both
            if float(output_error(W - tried, H).sum()) >= float(output_error(W - plain, H).sum()):
                report["awq_clip_shrink"] = 1.0  # the rounding did better unclipped
                return weight
        report["awq_clip_shrink"] = shrink
        return clipped

    def report(self, name: str) -> dict:
        return self._reports.get(name, {})

    def free(self, name: str) -> None:
        self._stats.free(name)
        self._reports.pop(name, None)

    @classmethod
    def summarize(cls, rows: list[dict]) -> list[tuple[str, str]]:
        awq = [r for r in rows if "awq_error_unscaled" in r or "awq_skipped" in r]
        if not awq:
            return []
        scaled = sum(1 for r in awq if r.get("awq_alpha") is not None)
        skipped = sorted({r["awq_skipped"] for r in awq if r.get("awq_skipped")})
        clipped = sum(1 for r in awq if r.get("awq_clip_shrink", 1.0) < 1.0)
        return [("AWQ", f"{scaled} of {len(awq)} linears scaled, {clipped} clipped"
                        + (f"; skipped: {'; '.join(skipped)}" if skipped else ""))]
