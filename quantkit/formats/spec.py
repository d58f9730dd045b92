"""Weight-quantization formats: the specs and the quantized-weight record.

IntSpec (integers, 2..8 bits, groups) is described here; FloatSpec (FP8 E4M3
weights, one scale per output channel or per tensor) below it.

A weight W [out, in] is split along `in` into groups of `group_size` columns
(the last group may be partial). Each (row, group) pair has its own scale s and
zero point z, and every element is stored as a signed integer

    q = clamp(round(w / s + z), qmin, qmax),   qmin = -2**(bits-1), qmax = 2**(bits-1) - 1
    w ~= (q - z) * s

Signed storage with signed zero points is the compressed-tensors convention, so
a symmetric spec always has z = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class IntSpec:
    """Integer weight quantization format.

    bits:       2..8 bits per stored value.
    symmetric:  True => z = 0 and s = absmax / ((qmax - qmin) / 2);
                False => s = (max - min) / (qmax - qmin) and z is chosen so that
                0.0 is exactly representable.
    group_size: columns sharing one (s, z) per row; None => one group spanning the
                whole row (per-output-channel). A partial last group is allowed.
    """

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = 128

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"IntSpec.bits must be an int in 2..8, got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"IntSpec.symmetric must be a bool, got {self.symmetric!r}")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0):
            raise ValueError(f"IntSpec.group_size must be a positive int or None, got {gs!r}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def num_groups(self, in_features: int) -> int:
        """ceil(in_features / group_size), or 1 when per-channel."""
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        if self.group_size is None:
            return 1
        return math.ceil(in_features / self.group_size)


@dataclass(frozen=True)
class FloatSpec:
    """FP8 (E4M3, largest finite value 448) weights: w ~= float8(w / s) * s, symmetric.

    strategy: "channel" => one scale per output row ([out, 1]); "tensor" => one
              scale for the whole weight ([1, 1] in memory, [1] on disk).
    The integer-spec attributes the report and the driver read (bits,
    symmetric, group_size) are fixed: 8, True, None.
    """

    strategy: str = "channel"

    def __post_init__(self) -> None:
        if self.strategy not in ("channel", "tensor"):
            raise ValueError(f"FloatSpec.strategy must be 'channel' or 'tensor', got {self.strategy!r}")

    bits = 8
    symmetric = True
    group_size = None

    def num_groups(self, in_features: int) -> int:
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        return 1

    def scale_rows(self, out_features: int) -> int:
        return out_features if self.strategy == "channel" else 1


WeightSpec = IntSpec | FloatSpec


def per_tensor(spec: IntSpec | FloatSpec) -> bool:
    """One scale for the whole weight (FP8 strategy "tensor"); integer specs never are."""
    return isinstance(spec, FloatSpec) and spec.strategy == "tensor"


@dataclass
class QuantizedWeight:
    """A weight quantized under `spec`; `dequantize()` gives (q - z) * s.

    Under a FloatSpec, q is float8_e4m3fn, scale is [out, 1] or [1, 1] and the
    zero point is all zeros (the dequantized weight is q * s).

    q:          int8 [out, in], values in [spec.qmin, spec.qmax]
    scale:      float [out, n_groups], in the original weight's dtype
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

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(q - z) * s as a [out, in] tensor of `dtype` (default: the scale's dtype)."""
        from quantkit.formats.qparams import dequantize  # qparams imports this module

        if isinstance(self.spec, FloatSpec):
            return (self.q.to(torch.float32) * self.scale.to(torch.float32)).to(dtype or self.scale.dtype)

        return dequantize(self.q, self.scale, self.zero_point, self.spec, self.g_idx, dtype)
