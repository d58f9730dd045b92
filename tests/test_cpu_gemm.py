"""The CPU GEMM entry points agree with torch whichever BLAS they pick."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantkit.kernels import cpu_gemm


@pytest.fixture(params=cpu_gemm.BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CPU_GEMM", request.param)
    return request.param


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(backend, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 24, generator=g).transpose(0, 1)  # non-contiguous [40, 3, 24]
    w = torch.randn(17, 24, generator=g)
    b = torch.randn(17, generator=g) if bias else None
    with torch.inference_mode():
        y = cpu_gemm.linear(x, w, b)
    assert cpu_gemm.backend() == backend
    assert y.shape == (40, 3, 17) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_leaves_other_dtypes_to_torch(backend):
    x, w = torch.randn(5, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    assert torch.equal(cpu_gemm.linear(x, w), F.linear(x, w))


def test_add_gram_matches_addmm(backend):
    g = torch.Generator().manual_seed(1)
    H0 = torch.randn(32, 32, generator=g)
    x = torch.randn(100, 32, generator=g)
    H = H0.clone()
    out = cpu_gemm.add_gram_(H, x, alpha=0.25, beta=0.5)
    assert out is H
    torch.testing.assert_close(H, 0.5 * H0 + 0.25 * x.T @ x, rtol=1e-5, atol=1e-4)


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("QUANTKIT_CPU_GEMM", "mkl")
    with pytest.raises(ValueError, match="QUANTKIT_CPU_GEMM"):
        cpu_gemm.backend()


def test_auto_picks_a_known_backend(monkeypatch):
    monkeypatch.delenv("QUANTKIT_CPU_GEMM", raising=False)
    assert cpu_gemm.backend() in cpu_gemm.BACKENDS
