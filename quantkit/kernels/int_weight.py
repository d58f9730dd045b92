"""The integer-weight dequant-matmul kernel: y = x @ dequant(W)^T (+ bias).

One entry point, `int_weight_matmul`, over the backends of op "int_weight" in
quantkit.kernels.registry. The reference backend (torch, any device, below) is the twin
every faster backend is tested against. Each backend also owns the in-memory layout of its
weights: `prepare_int_weight` turns the on-disk compressed-tensors tensors into that layout
once, at load time (as vLLM repacks at load), and the prepared weight names its backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantkit.formats import IntSpec, dequantize, unpack_int32
from quantkit.kernels import registry
from quantkit.kernels.registry import register_backend


@dataclass
class PreparedIntWeight:
    """One weight in the layout its backend wants.

    backend:  the name of its backend of op "int_weight"
    spec:     the integer format
    shape:    (N, K) = (out_features, in_features)
    tensors:  backend-specific; for "reference":
                q          int8 [N, K]
                scale      float [N, G]
                zero_point int8 [N, G] (zeros when symmetric)
                g_idx      int64 [K], group of each input column (act-order only;
                           otherwise groups are runs of group_size columns)
              for "cuda": quantkit.kernels.int_weight_layout.layout
    """

    backend: str
    spec: IntSpec
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, object] = field(default_factory=dict, compare=False, repr=False)  # backend bookkeeping


def _prepare_reference(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point_packed: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    spec: IntSpec,
    shape: tuple[int, int],
) -> PreparedIntWeight:
    n, k = shape
    q = unpack_int32(packed, spec.bits, (n, k), dim=1)  # int8 [N, K]
    if zero_point_packed is None:
        zp = torch.zeros(scale.shape, dtype=torch.int8, device=scale.device)
    else:
        zp = unpack_int32(zero_point_packed, spec.bits, tuple(scale.shape), dim=0)
    tensors = {"q": q, "scale": scale, "zero_point": zp}
    if g_idx is not None:  # act-order: columns are not in group order
        tensors["g_idx"] = g_idx.to(device=q.device, dtype=torch.int64)
    return PreparedIntWeight("reference", spec, (n, k), tensors)


@register_backend("int_weight", "reference", prepare=_prepare_reference)  # "cuda": quantkit.kernels.int_weight_cuda
def int_weight_matmul_reference(x: torch.Tensor, w: PreparedIntWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The twin: dequantize the whole weight in x's dtype, then torch's linear."""
    t = w.tensors
    weight = dequantize(t["q"], t["scale"], t["zero_point"], w.spec, t.get("g_idx"), dtype=x.dtype)  # [N, K]
    return torch.nn.functional.linear(x, weight, bias)


def prepare_int_weight(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point_packed: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    spec: IntSpec,
    shape: tuple[int, int],
    backend: str = "reference",
) -> PreparedIntWeight:
    """On-disk pack-quantized tensors -> the layout of `backend` (a name of op "int_weight";
    quantkit.kernels.select_backend("int_weight", ...) picks the fastest for a device).

    packed:            int32 [N, ceil(K * bits / 32)], values packed along K
    scale:             float [N, G]
    zero_point_packed: int32 [ceil(N * bits / 32), G] packed along N, or None (symmetric)
    g_idx:             int [K] or None (column // group_size)
    """
    n, k = shape
    g = spec.num_groups(k) if g_idx is None else int(g_idx.max().item()) + 1
    if tuple(scale.shape) != (n, g):
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {(n, g)} for weight {shape} under {spec}")
    return registry.backend("int_weight", backend).prepare(packed, scale, zero_point_packed, g_idx, spec, shape)


def int_weight_matmul(x: torch.Tensor, w: PreparedIntWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequant(w)^T + bias, computed in x's dtype, by w's backend."""
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {w.shape[1]}")
    return registry.backend("int_weight", w.backend).run(x, w, bias)

