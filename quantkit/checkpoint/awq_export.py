"""Export a quantkit checkpoint to the AWQ "GEMM" layout, for engines that only read that.

The layout is described in quantkit/checkpoint/awq.py (which also reads it
back). The weight is (q - z) * s, exactly what the compressed-tensors
checkpoint stores, so the export is lossless for the quantized linears except
that AWQ keeps its scales, like every other tensor, in float16 (AWQ's
activation dtype).

AWQ's format has one bit width (4), one group size for the whole model, a zero
point always (a symmetric weight gets z = 8) and no act-order g_idx; anything
else is refused with the reason.

A mixture of experts is written per expert under the names transformers writes
(as the compressed-tensors checkpoint), its routers listed with the float
linears in modules_to_not_convert (AutoAWQ and vLLM read a router as a linear).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantkit.checkpoint.awq import AWQ_ORDER, OFFSET, pack_awq
from quantkit.checkpoint.reader import load_checkpoint
from quantkit.checkpoint.writer import atomic_output
from quantkit.errors import CheckpointError
from quantkit.kernels import prepare_int_weight
from quantkit.models.families import block_family, checkpoint_name
from quantkit.nn import IntWeightLinear

__all__ = ["AWQ_ORDER", "awq_tensors", "export_awq", "pack_awq"]  # AWQ_ORDER, pack_awq: from awq.py


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
    return {
        "qweight": pack_awq((q.to(torch.int16) + OFFSET).T.contiguous()),
        "qzeros": pack_awq((zp.to(torch.int16) + OFFSET).T.contiguous()),
        "scales": scale.T.contiguous().to(torch.float16),
    }


def _routers(loaded) -> list[str]:
    """The routers of a mixture of experts' sparse layers (float, a weight [E, hidden] each)."""
    family, config = loaded.family, loaded.model.config
    moe = family.moe
    return [f"{family.blocks}.{i}.{moe.router}" for i in range(config.num_hidden_layers)
            if moe is not None and block_family(family, config, i) is not family]


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
    float_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)] + _routers(loaded)
    family = loaded.family
    state = {checkpoint_name(family, k): t for k, t in state.items()}
    float_linears = [checkpoint_name(family, n) for n in float_linears]
    config = copy.deepcopy(model.config)
    config.quantization_config = {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": groups[0], "zero_point": True,
        "modules_to_not_convert": float_linears or None,
    }
    config.torch_dtype = torch.float16
    with atomic_output(out, force, inputs=(src,)) as tmp:  # never onto (or around) the checkpoint it reads
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        # save_pretrained may rewrite quantization_config through a quantizer class; keep ours verbatim
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = config.quantization_config
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
    return Path(out).expanduser().resolve()
