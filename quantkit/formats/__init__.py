"""Quantized formats: the integer weight spec, qparams/RTN math, int32 packing, and
activation quantization (`quantkit.formats.activation`: int8 / FP8, per token or static)
and FP8 weights (`quantkit.formats.fp8`)."""

from quantkit.formats.activation import ActSpec
from quantkit.formats.pack import pack_int32, packed_shape, unpack_int32
from quantkit.formats.qparams import (
    compute_qparams,
    default_g_idx,
    dequantize,
    fake_quantize,
    group_minmax,
    quantize,
    quantize_rtn,
    stored_scale_dtype,
)
from quantkit.formats.spec import FloatSpec, IntSpec, WeightSpec, per_tensor
from quantkit.formats.weight import QuantizedWeight

__all__ = [
    "ActSpec",
    "FloatSpec",
    "IntSpec",
    "QuantizedWeight",
    "compute_qparams",
    "default_g_idx",
    "dequantize",
    "fake_quantize",
    "group_minmax",
    "pack_int32",
    "packed_shape",
    "per_tensor",
    "quantize",
    "quantize_rtn",
    "stored_scale_dtype",
    "unpack_int32",
    "WeightSpec",
]
