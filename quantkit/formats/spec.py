"""Weight-quantization formats: the specs (the quantized-weight record is quantkit.formats.weight).

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


SCALE_DTYPES = ("float16", "bfloat16", "float32")  # what IntSpec.scale_dtype may name


@dataclass(frozen=True)
class IntSpec:
    """Integer weight quantization format.

    bits:       2..8 bits per stored value.
    symmetric:  True => z = 0 and s = absmax / ((qmax - qmin) / 2);
                False => s = (max - min) / (qmax - qmin) and z is chosen so that
                0.0 is exactly representable.
    group_size: columns sharing one (s, z) per row; None => one group spanning the
                whole row (per-output-channel). A partial last group is allowed.
    scale_dtype: the dtype s is stored in ("float16", "bfloat16", "float32"); None => the
                weight's own (compressed-tensors' QuantizationArgs.scale_dtype). A float32
                model stores 4 bytes a group unless it asks for 16-bit scales here.
    """

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = 128
    scale_dtype: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"IntSpec.bits must be an int in 2..8, got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"IntSpec.symmetric must be a bool, got {self.symmetric!r}")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0):
            raise ValueError(f"IntSpec.group_size must be a positive int or None, got {gs!r}")
        if self.scale_dtype is not None and self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"IntSpec.scale_dtype must be one of {', '.join(SCALE_DTYPES)} or None, got {self.scale_dtype!r}")

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
