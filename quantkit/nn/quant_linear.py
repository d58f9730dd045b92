"""Linear layers whose weights stay quantized; forward calls one kernel entry point."""

from __future__ import annotations

import torch
from torch import nn

from quantkit.formats import IntSpec, packed_shape
from quantkit.kernels import PreparedIntWeight, int_weight_matmul, prepare_int_weight, select_backend


class IntWeightLinear(nn.Module):
    """y = x @ dequant(W)^T + b with W stored in compressed-tensors' pack-quantized layout.

    Buffers carry the checkpoint's names, so a state dict loads as it is on disk:
      weight_packed      int32 [N, ceil(K * bits / 32)]
      weight_scale       float [N, G]
      weight_zero_point  int32 [ceil(N * bits / 32), G]   (asymmetric only)
      weight_shape       int64 [2] = (N, K)
      weight_g_idx       int32 [K]                         (act-order only)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: IntSpec,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        has_g_idx: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        groups = spec.num_groups(in_features)
        kw = {"device": device}
        self.register_buffer("weight_packed", torch.zeros(packed_shape((out_features, in_features), spec.bits, 1), dtype=torch.int32, **kw))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, **kw))
        if not spec.symmetric:
            zp_shape = packed_shape((out_features, groups), spec.bits, 0)
            self.register_buffer("weight_zero_point", torch.zeros(zp_shape, dtype=torch.int32, **kw))
        else:
            self.weight_zero_point = None
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device))
        if has_g_idx:
            self.register_buffer("weight_g_idx", torch.zeros(in_features, dtype=torch.int32, **kw))
        else:
            self.weight_g_idx = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None
        self._prepared: PreparedIntWeight | None = None

    def prepare(self, backend: str | None = None) -> None:
        """Repack the on-disk tensors into the kernel's layout (once, after loading)."""
        backend = backend or select_backend(self.weight_packed.device)
        self._prepared = prepare_int_weight(
            self.weight_packed,
            self.weight_scale,
            self.weight_zero_point,
            self.weight_g_idx,
            self.spec,
            (self.out_features, self.in_features),
            backend=backend,
        )

    def _apply(self, fn, recurse=True):
        self._prepared = None  # moved or cast: the kernel layout must be rebuilt
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._prepared is None:
            self.prepare()
        return int_weight_matmul(x, self._prepared, self.bias)

    def extra_repr(self) -> str:
        s = self.spec
        return f"in={self.in_features}, out={self.out_features}, bits={s.bits}, group={s.group_size}, symmetric={s.symmetric}"
