"""AWQ driven by the block-by-block pipeline (math in awq_math.py).

AWQ does not round: it rescales input channels (folding the inverse scales
into the op before, as the family's mappings say) and clips each group's range,
then the recipe's rounding step (rtn or gptq) rounds the transformed weights.
The driver calls, per block: observe (one pass over the float block), then
search_scales / scaled for each mapping it can fold, then clip per linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.algorithms.awq_math import Rounder, ScaleSearch, output_error, scale_hessian, search_clip, search_scales
from quantkit.algorithms.base import Algorithm, register
from quantkit.algorithms.gptq_math import accumulate_hessian, equalize_tokens, make_hessian
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
    # minimize (as GPTQ's equalize_tokens); the activation magnitudes are plain
    equalize_tokens: bool = True

    def __post_init__(self) -> None:
        for key in ("grid", "clip_grid"):
            if not 1 <= getattr(self, key) <= MAX_GRID:
                raise ValueError(f"{key} must be in 1..{MAX_GRID}, got {shown(getattr(self, key))}")
        if not 0 < self.max_shrink < 1:  # NaN fails too
            raise ValueError(f"max_shrink must be in (0, 1), got {self.max_shrink}")


@register
class AWQ(Algorithm):
    name = "awq"
    Options = AWQOptions
    needs_activations = True
    rounds = False
    transforms = True

    def __init__(self, options: AWQOptions) -> None:
        super().__init__(options)
        # name -> [H, n, sum |x| per channel], shared by the linears of one input
        self._stats: dict[str, list] = {}
        self._reports: dict[str, dict] = {}

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        entry = self._stats.get(names[0])
        if entry is None:
            entry = [make_hessian(x.shape[-1], x.device), 0, torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)]
            for name in names:
                self._stats[name] = entry
        entry[2] += x.to(torch.float32).abs().sum(dim=0).to(torch.float64)  # float32 within a batch, float64 across
        rows = equalize_tokens(x) if self.options.equalize_tokens else x
        entry[1] = accumulate_hessian(entry[0], entry[1], rows)

    def _entry(self, name: str) -> list:
        if name not in self._stats:
            raise RuntimeError(f"AWQ saw no calibration input for {name}")
        return self._stats[name]

    def search_scales(self, names: list[str], weights: list[torch.Tensor], specs: list[IntSpec],
                      rounder: Rounder | None = None) -> ScaleSearch:
        H, n, abs_sum = self._entry(names[0])
        x_mag = (abs_sum / max(n, 1)).to(torch.float32)
        found = search_scales(weights, H, x_mag, specs, self.options.grid, self.options.duo_scaling, rounder)
        for name in names:
            self._reports.setdefault(name, {}).update({
                "awq_alpha": found.alpha,  # None: the unscaled weights rounded best
                "awq_error": found.error,
                "awq_error_unscaled": found.error_unscaled,
            })
        return found

    def scaled(self, names: list[str], s: torch.Tensor) -> None:
        """The driver folded `s` in: the linears' input is now x / s."""
        entry = self._entry(names[0])
        entry[0] = scale_hessian(entry[0], s)

    def skip(self, names: list[str], reason: str) -> None:
        for name in names:
            self._reports.setdefault(name, {})["awq_skipped"] = reason

    def clip(self, name: str, weight: torch.Tensor, spec: IntSpec, rounder: Rounder | None = None) -> torch.Tensor:
        """The clip search (scored with round-to-nearest); with `rounder`, the
        clipped weight is kept only if that rounding does better with it."""
        if not self.options.clip:
            return weight
        H = self._entry(name)[0]
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

    def layer_report(self, name: str) -> dict:
        return self._reports.get(name, {})

    def free(self, name: str) -> None:
        self._stats.pop(name, None)
        self._reports.pop(name, None)
