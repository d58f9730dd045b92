"""The AWQ "GEMM" layout (AutoAWQ's `WQLinear_GEMM`, vLLM's `awq`): read and written.

Per linear X with K inputs, N outputs, group size g:

    X.qweight  int32   [K, N / 8]       4-bit values, unsigned (q + 8), eight per word
    X.qzeros   int32   [K / g, N / 8]   zero points, unsigned, packed the same way
    X.scales   float16 [K / g, N]

Both int32 tensors are the transposed ([in, out]) matrices packed along the
output dimension in AWQ's interleaved order: the 4-bit field i (bits
4i..4i+3) of word c holds column 8c + ORDER[i], ORDER = (0, 2, 4, 6, 1, 3, 5, 7).
The weight is (u - uz) * s with u, uz unsigned; quantkit stores signed values
q = u - 8 and zero points z = uz - 8, so (q - z) * s is the same weight and
reading is exact.

config.json's quantization_config: {"quant_method": "awq", "version": "gemm",
"bits": 4, "group_size": g, "zero_point": true, "modules_to_not_convert": [...]}.
Like transformers, every linear but the output embedding and those whose
name contains an entry of modules_to_not_convert is quantized.
"""

from __future__ import annotations

import torch

from quantkit.checkpoint.config import FLOAT_DTYPES, Expected, LinearScheme, field, string_list, typed
from quantkit.errors import CheckpointError
from quantkit.formats import IntSpec, pack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
OFFSET = 8  # unsigned 4-bit u = signed q + 8


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values [R, C] (C a multiple of 8) -> int32 [R, C / 8] in AWQ's order."""
    if values.ndim != 2 or values.shape[1] % 8:
        raise ValueError(f"AWQ packs [rows, cols] with cols a multiple of 8, got {tuple(values.shape)}")
    if int(values.min()) < 0 or int(values.max()) > 15:
        raise ValueError("AWQ packs unsigned 4-bit values (0..15)")
    v = values.to(torch.int64).reshape(values.shape[0], -1, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (v << shifts).sum(dim=-1)  # < 2**32: fits int64; reinterpret as int32 below
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] in AWQ's order -> unsigned 4-bit values int16 [R, C] (inverse of pack_awq)."""
    w = words.to(torch.int64)  # & 0xF below also drops the sign extension of negative words
    fields = torch.stack([(w >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # [R, C/8, 8]: field i
    out = torch.empty_like(fields)
    out[:, :, list(AWQ_ORDER)] = fields  # field i holds column 8c + ORDER[i]
    return out.reshape(words.shape[0], -1).to(torch.int16)


def parse_awq_config(qconfig: dict, where: str) -> tuple[int, list[str]]:
    """(group size, modules_to_not_convert) of an AWQ GEMM quantization_config."""
    path = "quantization_config"
    try:
        bits = field(qconfig, "bits", "integer", path, required=True)
        group_size = field(qconfig, "group_size", "integer", path, required=True)
        zero_point = field(qconfig, "zero_point", "bool", path, True)
        skip = string_list(qconfig.get("modules_to_not_convert"), f"{path}.modules_to_not_convert")
        typed(qconfig.get("version", "gemm"), "string", f"{path}.version")
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if bits != 4 or not zero_point:
        raise CheckpointError(f"{where}: an AWQ checkpoint with bits {bits} and zero_point {str(zero_point).lower()}, "
                              f"which quantkit does not read (AWQ GEMM: 4 bits with zero points)")
    if group_size <= 0:
        raise CheckpointError(f"{where}: quantization_config.group_size: AWQ GEMM needs a positive group size, got {group_size}")
    return group_size, skip


def awq_quantizes(name: str, skip: list[str], output_embedding: str | None) -> bool:
    """Whether linear `name` is stored in the AWQ layout (transformers' rule: a substring match)."""
    return name != output_embedding and not any(s in name for s in skip)


def awq_scheme(group_size: int) -> LinearScheme:
    """The scheme an AWQ GEMM linear is read into: 4-bit, asymmetric."""
    return LinearScheme(IntSpec(bits=4, symmetric=False, group_size=group_size))


def awq_layout(name: str, out: int, inp: int, group_size: int, bias: bool) -> dict[str, Expected]:
    """The tensors linear `name` ([out, inp] weight) stores in the AWQ GEMM layout."""
    if out % 8:
        raise CheckpointError(f"{name}: AWQ GEMM packs 8 outputs per word, this layer has {out} outputs")
    if inp % group_size:
        raise CheckpointError(f"{name}: AWQ GEMM needs whole groups, {inp} inputs are not a multiple of group size {group_size}")
    g = inp // group_size
    t = {
        f"{name}.qweight": Expected(("I32",), (inp, out // 8), f"4-bit values of a [{out}, {inp}] weight, transposed, 8 per word"),
        f"{name}.qzeros": Expected(("I32",), (g, out // 8), f"4-bit zero points, group size {group_size} on {inp} inputs"),
        f"{name}.scales": Expected(FLOAT_DTYPES, (g, out), f"group size {group_size} on {inp} inputs: {g} groups"),
    }
    if bias:
        t[f"{name}.bias"] = Expected(FLOAT_DTYPES, (out,), "the bias")
    return t


def awq_to_compressed(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Replace each AWQ linear's qweight/qzeros/scales in `state` by quantkit's pack-quantized
    tensors (weight_packed, weight_zero_point, weight_scale, weight_shape), exactly."""
    for name in names:
        qweight, qzeros, scales = (state.pop(f"{name}.{k}") for k in ("qweight", "qzeros", "scales"))
        q = (unpack_awq(qweight).T - OFFSET).to(torch.int8)  # [N, K], signed
        z = (unpack_awq(qzeros).T - OFFSET).to(torch.int8)  # [N, G], signed
        state[f"{name}.weight_packed"] = pack_int32(q.contiguous(), 4, dim=1)
        state[f"{name}.weight_zero_point"] = pack_int32(z.contiguous(), 4, dim=0)
        state[f"{name}.weight_scale"] = scales.T.contiguous()
        state[f"{name}.weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
    return state
