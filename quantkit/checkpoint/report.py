"""The quantization report's per-linear rows and the sizes they count.

One row per quantized linear, as quantization_report.json stores it:

    name, shape [out, in], bits, group_size, symmetric, algorithm (the rounding),
    weight_rel_error ||W - Q|| / ||W||, bytes_float, bytes_quantized (packed
    values, scales, zero points, g_idx as written), seconds, weight_type (FP8),
    then what the algorithms found (awq_*, smooth_*, gptq_*, ...), W8A8,
    how the inputs are quantized and, for an expert of a mixture of experts,
    the tokens it was routed and observed and any fallback (moe_*, quantkit.experts).
"""

from __future__ import annotations

import math

from quantkit.experts import summary_lines as expert_lines
from quantkit.formats import FloatSpec, QuantizedWeight, packed_shape
from quantkit.pipeline import LinearResult, QuantizationResult


def packed_nbytes(qw: QuantizedWeight, unpacked: bool = False) -> int:
    """Bytes on disk: packed values, scales and (asymmetric) packed zero points. unpacked: the
    int-quantized / float-quantized layout (quantized activations), one byte per value."""
    out_f, in_f = qw.q.shape
    if isinstance(qw.spec, FloatSpec) or unpacked:
        return qw.q.numel() + qw.scale.numel() * qw.scale.element_size()  # one byte per value
    n = 4 * math.prod(packed_shape((out_f, in_f), qw.spec.bits, 1)) + qw.scale.numel() * qw.scale.element_size()
    if not qw.spec.symmetric:
        n += 4 * math.prod(packed_shape(tuple(qw.zero_point.shape), qw.spec.bits, 0))
    if qw.g_idx is not None:
        n += 4 * in_f
    return n


def layer_rows(result: QuantizationResult) -> list[dict]:
    return [linear_row(r, unpacked=result.activations is not None) for r in result.linears]


def linear_row(r: LinearResult, unpacked: bool = False) -> dict:
    """The report row of one quantized linear (unpacked: written int-quantized / float-quantized)."""
    qw, spec = r.weight, r.weight.spec
    row = {
        "name": r.name,
        "shape": list(qw.q.shape),
        "bits": spec.bits,
        "group_size": spec.group_size,
        "symmetric": spec.symmetric,
        "algorithm": r.algorithm,
        "weight_rel_error": r.weight_rel_error,
        "bytes_float": qw.q.numel() * r.float_dtype.itemsize,
        "bytes_quantized": packed_nbytes(qw, unpacked),
        "seconds": r.seconds,
    }
    if isinstance(spec, FloatSpec):
        row["weight_type"] = f"fp8 e4m3 per-{spec.strategy}"
    return row | r.facts


def summary_lines(rows: list[dict], activations: dict | None) -> list[tuple[str, str]]:
    """(label, text) lines every run has: the weights' error and, W8A8, the inputs."""
    lines = []
    if rows:
        worst = max(rows, key=lambda r: r["weight_rel_error"])
        mean = sum(r["weight_rel_error"] for r in rows) / len(rows)
        lines.append(("weight rel. error", f"mean {mean:.4f}, worst {worst['weight_rel_error']:.4f} ({worst['name']})"))
    if activations:
        how = "dynamic per-token" if activations["dynamic"] else "static per-tensor (calibrated)"
        lines.append(("inputs", f"{activations['type']} {how}"))
    return lines + expert_lines(rows)  # a mixture of experts: tokens per expert, fallbacks
