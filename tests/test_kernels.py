"""The kernel entry point against plain torch: x @ dequantize(W)^T."""

from __future__ import annotations

import pytest
import torch

from quantkit.formats import IntSpec, pack_int32, quantize_rtn
from quantkit.kernels import int_weight_matmul, prepare_int_weight, select_backend


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
    assert select_backend("cpu") == "reference"
    with pytest.raises(ValueError, match="unknown kernel backend 'nope'"):
        select_backend("cpu", "nope")
