"""The kernel entry point against plain torch (x @ dequantize(W)^T), and the backend registry's choice rule."""

from __future__ import annotations

import pytest
import torch

from quantkit.formats import IntSpec, pack_int32, quantize_rtn
from quantkit.kernels import int_weight_matmul, prepare_int_weight, registry, select_backend


def _prepared(qw, backend="reference"):
    zp = None if qw.spec.symmetric else pack_int32(qw.zero_point, qw.spec.bits, dim=0)
    n, k = qw.q.shape
    return prepare_int_weight(pack_int32(qw.q, qw.spec.bits, 1), qw.scale, zp, qw.g_idx, qw.spec, (n, k), backend)


@pytest.mark.parametrize("n,k", [(64, 128), (33, 96), (7, 200), (1, 576)])
@pytest.mark.parametrize("spec", [IntSpec(4, True, 32), IntSpec(4, False, 64), IntSpec(3, False, 32), IntSpec(8, True, None), IntSpec(2, True, 16)])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_reference_matches_dequantize_then_matmul(n, k, spec, m):
    g = torch.Generator().manual_seed(n * 1000 + k + m)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    qw = quantize_rtn(w, spec)
    y = int_weight_matmul(x, _prepared(qw), bias)
    torch.testing.assert_close(y, x @ qw.dequantize().T + bias, rtol=1e-5, atol=1e-5)


def test_act_order_g_idx_reads_each_columns_group():
    g = torch.Generator().manual_seed(0)
    spec = IntSpec(4, False, 16)
    w = torch.randn(24, 64, generator=g)
    qw = quantize_rtn(w, spec)
    perm = torch.randperm(64, generator=g)
    # permute the columns but keep each column's group: a valid act-order layout
    g_idx = (torch.arange(64) // 16)[perm].to(torch.int32)
    qw.q, qw.g_idx = qw.q[:, perm].contiguous(), g_idx
    x = torch.randn(5, 64, generator=g)
    y = int_weight_matmul(x, _prepared(qw))
    torch.testing.assert_close(y, x @ qw.dequantize().T, rtol=1e-5, atol=1e-5)


def test_batched_leading_dims_and_dtype():
    w = torch.randn(48, 64)
    qw = quantize_rtn(w, IntSpec(4, True, 32))
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = int_weight_matmul(x, _prepared(qw))
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16


def test_bad_shapes_raise_naming_the_value():
    qw = quantize_rtn(torch.randn(16, 64), IntSpec(4, True, 32))
    prepared = _prepared(qw)
    with pytest.raises(ValueError, match="63"):
        int_weight_matmul(torch.randn(2, 63), prepared)
    with pytest.raises(ValueError, match=r"scale has shape \(16, 3\)"):
        prepare_int_weight(pack_int32(qw.q, 4, 1), torch.ones(16, 3), None, None, qw.spec, (16, 64))


def test_backend_selection():
    assert select_backend("int_weight", "cpu").name == "reference"
    assert select_backend("int_weight", "cpu", torch.float16, IntSpec(4, True, 128)).name == "reference"
    with pytest.raises(ValueError, match="unknown int_weight backend 'nope'; available: reference, cuda"):
        select_backend("int_weight", "cpu", override="nope")
    with pytest.raises(ValueError, match="'cuda' is not available on cpu"):
        select_backend("int_weight", "cpu", override="cuda")


def test_every_op_has_its_torch_twin_registered():
    for op in ("int_weight", "w8a8", "rms_norm_matmul", "add_rms_norm", "silu_mul", "rope_cache", "paged_attention"):
        assert "reference" in registry.backends(op), op


def test_the_choice_rule(monkeypatch):
    """An override when it is available (else an error), else the fastest available, else "reference"."""
    monkeypatch.setattr(registry, "_BACKENDS", {})
    seen = []

    def gpu_only(device, dtype, spec):
        seen.append((device, dtype, spec))
        return device.type == "cuda" and dtype != torch.float32

    registry.register_backend("op", "reference")(lambda: "ref")
    registry.register_backend("op", "torch", available=gpu_only)(lambda: "torch")
    registry.register_backend("op", "cuda", available=lambda device, dtype, spec: spec == "fast")(lambda: "cuda")
    assert registry.select_backend("op", "cpu").run() == "ref"
    assert registry.select_backend("op", "cuda", torch.float16, "slow").run() == "torch"
    assert seen[-1] == (torch.device("cuda"), torch.float16, "slow")
    assert registry.select_backend("op", "cuda", torch.float16, "fast").run() == "cuda"  # cuda before torch
    assert registry.select_backend("op", "cuda", torch.float32).run() == "ref"
    assert registry.select_backend("op", "cuda", torch.float32, override="reference").run() == "ref"
    with pytest.raises(ValueError, match=r"op backend 'torch' is not available on cpu for None in torch.float16"):
        registry.select_backend("op", "cpu", torch.float16, override="torch")
    assert registry.backend("op", "cuda").run() == "cuda" and list(registry.backends("op")) == ["reference", "torch", "cuda"]
