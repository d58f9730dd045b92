"""Round-to-nearest: each group's scale from its min/max (FP8: each row's or the tensor's max), no calibration data."""

from __future__ import annotations

import torch

from quantkit.algorithms.base import Algorithm, register
from quantkit.formats import IntSpec, QuantizedWeight, quantize_rtn


@register
class RTN(Algorithm):
    name = "rtn"
    float_weights = True

    def quantize(self, name: str, weight: torch.Tensor, spec: IntSpec) -> QuantizedWeight:
        return quantize_rtn(weight, spec)
