"""Round-to-nearest: each group's scale from its min/max, no calibration data."""

from __future__ import annotations

import torch

from quantkit.algorithms.base import Algorithm, register
from quantkit.formats import IntSpec, QuantizedWeight, quantize_rtn


@register
class RTN(Algorithm):
    name = "rtn"

    def quantize(self, name: str, weight: torch.Tensor, spec: IntSpec) -> QuantizedWeight:
        return quantize_rtn(weight, spec)
