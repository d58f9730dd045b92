"""Export a quantkit checkpoint to the AWQ "GEMM" layout, for engines that only read that.

The AWQ GEMM layout (AutoAWQ's `WQLinear_GEMM`, vLLM's `awq`), per linear X
with K inputs, N outputs, group size g:

    X.qweight  int32   [K, N / 8]   4-bit values, unsigned (q + 8), eight per word
    X.qzeros   int32   [K / g, N / 8]   zero points, unsigned, packed the same way
    X.scales   float16 [K / g, N]

Both are the transposed ([in, out]) matrices packed along the output
dimension in AWQ's interleaved order: the 4-bit field i (bits 4i..4i+3) of word
c holds column 8c + ORDER[i], ORDER = (0, 2, 4, 6, 1, 3, 5, 7). The weight is
(q - z) * s, exactly what the compressed-tensors checkpoint stores, so the
export is lossless for the quantized linears (other tensors go to float16,
AWQ's activation dtype).

AWQ's format has one bit width (4), one group size for the whole model, a zero
point always (a symmetric weight gets z = 8) and no act-order g_idx; anything
else is refused with the reason.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantkit.checkpoint.reader import load_checkpoint
from quantkit.checkpoint.writer import atomic_output
from quantkit.errors import CheckpointError
from quantkit.kernels import prepare_int_weight
from quantkit.nn import IntWeightLinear

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


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


def awq_tensors(module: IntWeightLinear) -> dict[str, torch.Tensor]:
    """qweight / qzeros / scales of one quantized linear."""
    spec, (n, k) = module.spec, (module.out_features, module.in_features)
    if spec.bits != 4:
        raise CheckpointError(f"AWQ stores 4-bit weights; this layer has {spec.bits} bits")
    if spec.group_size is None or k % spec.group_size:
        raise CheckpointError(f"AWQ needs whole groups along the input; group size {spec.group_size} with {k} inputs")
    if n % 8:
        raise CheckpointError(f"AWQ packs 8 outputs per word; this layer has {n} outputs")
    if module.weight_g_idx is not None:
        raise CheckpointError("AWQ has no act-order g_idx; re-quantize with actorder none or weight")
    prepared = prepare_int_weight(module.weight_packed, module.weight_scale, module.weight_zero_point, None, spec, (n, k),
                                  backend="reference")
    q, scale, zp = prepared.tensors["q"], prepared.tensors["scale"], prepared.tensors["zero_point"]
    offset = -spec.qmin  # signed -> unsigned: 8 for 4 bits
    return {
        "qweight": pack_awq((q.to(torch.int16) + offset).T.contiguous()),
        "qzeros": pack_awq((zp.to(torch.int16) + offset).T.contiguous()),
        "scales": scale.T.contiguous().to(torch.float16),
    }


def export_awq(src: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Write `src` (a quantkit checkpoint) in the AWQ GEMM layout to `out`, atomically."""
    loaded = load_checkpoint(src)
    model = loaded.model
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, IntWeightLinear)}
    groups = sorted({m.spec.group_size for m in quantized.values()}, key=str)
    if len(groups) != 1:
        raise CheckpointError(f"AWQ's format has one group size for the whole model; {src} has {groups} "
                              f"(quantize with one group size that divides every layer's width)")
    state: dict[str, torch.Tensor] = {}
    for name, module in quantized.items():
        try:
            tensors = awq_tensors(module)
        except CheckpointError as e:
            raise CheckpointError(f"{name}: {e}") from None
        state.update({f"{name}.{key}": t for key, t in tensors.items()})
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach().to(torch.float16)
    skip = tuple(f"{name}." for name in quantized)
    for key, t in model.state_dict().items():
        if not key.startswith(skip):
            state[key] = t.detach().to(torch.float16) if t.is_floating_point() else t
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    float_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    config = copy.deepcopy(model.config)
    config.quantization_config = {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": groups[0], "zero_point": True,
        "modules_to_not_convert": float_linears or None,
    }
    config.torch_dtype = torch.float16
    with atomic_output(out, force) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        # save_pretrained may rewrite quantization_config through a quantizer class; keep ours verbatim
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = config.quantization_config
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
    return Path(out).expanduser().resolve()
