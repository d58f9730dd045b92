"""Round-to-nearest: each group's scale from its min/max (FP8: each row's or the tensor's max), no calibration data."""

from __future__ import annotations

import torch

from quantkit.algorithms.base import Rounding, WeightSpec, register
from quantkit.distributed import ALONE, Group
from quantkit.formats import FloatSpec, IntSpec, QuantizedWeight, quantize_rtn


@register
class RTN(Rounding):
    name = "rtn"
    weight_specs = (IntSpec, FloatSpec)

    def round_group(self, names: list[str], weights: list[torch.Tensor], specs: list[WeightSpec],
                    share: Group = ALONE) -> list[QuantizedWeight]:
        return [quantize_rtn(w, spec) for w, spec in zip(weights, specs)]
