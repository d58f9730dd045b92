"""Linear layers whose weights (and, W8A8, inputs) stay quantized; forward calls one kernel entry point."""

from __future__ import annotations

import torch
from torch import nn

from quantkit.formats import ActSpec, FloatSpec, IntSpec, packed_shape, per_tensor
from quantkit.formats.activation import FP8_E4M3_MAX
from quantkit.kernels import PreparedIntWeight, PreparedW8A8, int_weight_matmul, prepare_int_weight, prepare_w8a8, select_backend, w8a8_matmul


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
        backend = backend or select_backend("int_weight", self.weight_packed.device, self.weight_scale.dtype, self.spec).name
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

    def prepared(self) -> PreparedIntWeight:
        """The weight in the kernel's layout, prepared on first use."""
        if self._prepared is None:
            self.prepare()
        return self._prepared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int_weight_matmul(x, self.prepared(), self.bias)

    def extra_repr(self) -> str:
        s = self.spec
        return f"in={self.in_features}, out={self.out_features}, bits={s.bits}, group={s.group_size}, symmetric={s.symmetric}"


class W8A8Linear(nn.Module):
    """y = Q(x) @ Q(W)^T * s_x * s_w + b, compressed-tensors' int-quantized / float-quantized layout
    (W8A8, and W4A8: integer weights of fewer bits in int8, one scale per group).

    Buffers carry the checkpoint's names:
      weight        int8 | float8_e4m3fn [N, K]
      weight_scale  float [N, 1] (per channel), [N, G] (in groups) or [1] (per tensor)
      input_scale   float [1]                (static activations only)

    With `track_saturation` on (static activations), forward counts the input
    values beyond the calibrated range (clamped by the quantizer) in
    `saturated` / `seen`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weights: IntSpec | FloatSpec,
        act: ActSpec,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec, self.act = in_features, out_features, weights, act
        kw = {"device": device}
        wdtype = torch.float8_e4m3fn if isinstance(weights, FloatSpec) else torch.int8
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=wdtype, **kw))
        scale_shape = (1,) if per_tensor(weights) else (out_features, weights.num_groups(in_features))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=dtype, **kw))
        if not act.dynamic:
            self.register_buffer("input_scale", torch.ones(1, dtype=dtype, **kw))
        else:
            self.input_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None
        self.track_saturation = False
        self.saturated = self.seen = 0
        self._prepared: PreparedW8A8 | None = None

    def prepare(self, backend: str | None = None) -> None:
        self._prepared = prepare_w8a8(self.weight, self.weight_scale, self.input_scale, self.spec, self.act, backend)

    def _apply(self, fn, recurse=True):
        self._prepared = None
        return super()._apply(fn, recurse)

    def prepared(self) -> PreparedW8A8:
        """The weight in the kernel's layout, prepared on first use."""
        if self._prepared is None:
            self.prepare()
        return self._prepared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.track_saturation and self.input_scale is not None:
            limit = self.input_scale.float() * (FP8_E4M3_MAX if self.act.type == "fp8" else 127.0)  # the largest value kept
            self.saturated = self.saturated + (x.abs() > limit).sum()
            self.seen += x.numel()
        return w8a8_matmul(x, self.prepared(), self.bias)

    def extra_repr(self) -> str:
        s = self.spec
        w = (f"fp8 {s.strategy}" if isinstance(s, FloatSpec)
             else f"int{s.bits} {'channel' if s.group_size is None else f'group {s.group_size}'}")
        a = f"{self.act.type} {'dynamic per-token' if self.act.dynamic else 'static per-tensor'}"
        return f"in={self.in_features}, out={self.out_features}, weights={w}, inputs={a}"
