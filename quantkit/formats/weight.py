"""The quantized-weight record: q, scale, zero point (and act-order g_idx) under one spec."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.formats.grouped import dequantize
from quantkit.formats.spec import FloatSpec, IntSpec


@dataclass
class QuantizedWeight:
    """A weight quantized under `spec`; `dequantize()` gives (q - z) * s.

    Under a FloatSpec, q is float8_e4m3fn, scale is [out, 1] or [1, 1] and the
    zero point is all zeros (the dequantized weight is q * s).

    q:          int8 [out, in], values in [spec.qmin, spec.qmax]
    scale:      float [out, n_groups], in the original weight's dtype (or spec.scale_dtype)
    zero_point: int8 [out, n_groups], signed; all zeros when symmetric
    g_idx:      int32 [in], group of each input column (act-order), or None for
                the default column // group_size (all zeros when per-channel)
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: IntSpec | FloatSpec
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.spec, FloatSpec):
            self._check_float()
            return
        if self.q.dtype != torch.int8 or self.q.ndim != 2:
            raise ValueError(f"q must be a 2-D int8 tensor, got {self.q.dtype} {tuple(self.q.shape)}")
        out, n_in = self.q.shape
        if self.scale.ndim != 2 or self.scale.shape[0] != out or not self.scale.is_floating_point():
            raise ValueError(
                f"scale must be float [out={out}, n_groups], got {self.scale.dtype} {tuple(self.scale.shape)}"
            )
        if self.zero_point.dtype != torch.int8 or self.zero_point.shape != self.scale.shape:
            raise ValueError(
                f"zero_point must be int8 with scale's shape {tuple(self.scale.shape)}, "
                f"got {self.zero_point.dtype} {tuple(self.zero_point.shape)}"
            )
        if self.g_idx is None:
            expected = self.spec.num_groups(n_in)
            if self.scale.shape[1] != expected:
                raise ValueError(
                    f"scale has {self.scale.shape[1]} groups but {self.spec} on {n_in} columns "
                    f"needs {expected}"
                )
        elif tuple(self.g_idx.shape) != (n_in,):
            raise ValueError(f"g_idx must have shape ({n_in},), got {tuple(self.g_idx.shape)}")

    def _check_float(self) -> None:
        if self.q.dtype != torch.float8_e4m3fn or self.q.ndim != 2:
            raise ValueError(f"q must be a 2-D float8_e4m3fn tensor under {self.spec}, got {self.q.dtype} {tuple(self.q.shape)}")
        rows = self.spec.scale_rows(self.q.shape[0])
        if tuple(self.scale.shape) != (rows, 1) or not self.scale.is_floating_point():
            raise ValueError(f"scale must be float [{rows}, 1] under {self.spec}, got {self.scale.dtype} {tuple(self.scale.shape)}")
        if self.zero_point.shape != self.scale.shape or self.g_idx is not None:
            raise ValueError("an FP8 weight has zero zero points of the scale's shape and no g_idx")

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def to(self, device) -> QuantizedWeight:
        """The same weight with its tensors on `device`."""
        return QuantizedWeight(self.q.to(device), self.scale.to(device), self.zero_point.to(device), self.spec,
                               None if self.g_idx is None else self.g_idx.to(device))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(q - z) * s as a [out, in] tensor of `dtype` (default: the scale's dtype)."""
        if isinstance(self.spec, FloatSpec):
            return (self.q.to(torch.float32) * self.scale.to(torch.float32)).to(dtype or self.scale.dtype)

        return dequantize(self.q, self.scale, self.zero_point, self.spec, self.g_idx, dtype)
