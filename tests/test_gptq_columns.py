"""GPTQ's column loop as an op (quantkit.kernels.gptq_columns): the CUDA kernel of csrc/gptq_columns.cu
against the torch twin, and gptq_quantize through either.

The twin runs everywhere (tests/test_gptq.py checks GPTQ's math through it); the kernel tests need a
CUDA GPU and CuPy and skip cleanly without them.
"""

from __future__ import annotations

import pytest
import torch

from quantkit.algorithms.gptq_math import inverse_cholesky, gptq_quantize
from quantkit.formats import FloatSpec, IntSpec, quantize_rtn
from quantkit.kernels import cuda, select_backend
from quantkit.kernels.gptq_columns import OVERRIDE_VARIABLE, gptq_columns

gpu = pytest.mark.skipif(not cuda.available(), reason="needs a CUDA GPU and CuPy")


def _hessian(k: int, n: int = 512, device="cpu", seed=0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, k, device=device, generator=g) * torch.linspace(0.2, 3.0, k, device=device)  # unequal columns
    return x.T @ x / n


def test_the_cpu_takes_the_twin_and_an_unknown_backend_is_refused(monkeypatch):
    spec = IntSpec(4, True, 128)
    assert select_backend("gptq_columns", "cpu", torch.float32, spec).name == "reference"
    w = torch.randn(8, 16)
    monkeypatch.setenv(OVERRIDE_VARIABLE, "nonesuch")
    with pytest.raises(ValueError, match="unknown gptq_columns backend 'nonesuch'"):
        gptq_quantize(w, _hessian(16), spec=IntSpec(4, True, None))
    monkeypatch.setenv(OVERRIDE_VARIABLE, "cuda")  # named, but not available on the CPU: said so
    with pytest.raises(ValueError, match="not available on cpu"):
        gptq_quantize(w, _hessian(16), spec=IntSpec(4, True, None))


def test_the_twin_rounds_a_block_as_the_paper_says():
    """One block by hand in float64: column i rounded, its scaled error pushed onto the later columns."""
    out, B = 6, 5
    spec = IntSpec(4, False, None)
    W1 = torch.randn(B, out)
    U, _ = inverse_cholesky(_hessian(B), 0.01)
    qw = quantize_rtn(W1.T.contiguous(), spec)
    s_rows, z_rows = qw.scale.T.float().contiguous(), qw.zero_point.T.float().contiguous()
    Q1, E1, W = torch.zeros(B, out), torch.zeros(B, out), W1.double().clone()
    gptq_columns(W1, Q1, E1, U, s_rows, z_rows, torch.zeros(B, dtype=torch.int32), 0, B, spec)
    s, z = s_rows[0].double(), z_rows[0].double()
    for i in range(B):
        q = torch.clamp(torch.round(W[i] / s + z), spec.qmin, spec.qmax)
        e = (W[i] - (q - z) * s) / U[i, i].double()
        assert torch.equal(Q1[i].double(), q)
        torch.testing.assert_close(E1[i].double(), e, rtol=1e-5, atol=1e-6)
        W[i + 1:] -= U[i, i + 1:].double()[:, None] * e[None, :]


# ---- on the GPU ------------------------------------------------------------------------------

SPECS = [IntSpec(4, True, 128), IntSpec(4, False, 128), IntSpec(4, True, 32), IntSpec(3, False, 64),
         IntSpec(8, True, None), IntSpec(4, False, 256), IntSpec(2, True, 32)]


@gpu
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("out, B, c0, c1", [(4096, 128, 0, 128), (45, 128, 32, 96), (1000, 64, 0, 64), (33, 200, 10, 200)])
def test_the_kernel_rounds_a_block_as_the_twin(spec, out, B, c0, c1):
    torch.manual_seed(out + B)
    gs = spec.group_size or B
    groups = (torch.arange(B, device="cuda") // gs).to(torch.int32)
    W1 = torch.randn(B, out, device="cuda")
    U, _ = inverse_cholesky(_hessian(B, device="cuda"), 0.01)
    qw = quantize_rtn(torch.randn(out, -(-B // gs) * gs, device="cuda") * 1.5, spec)  # a scale per row and group
    s_rows, z_rows = qw.scale.T.float().contiguous(), qw.zero_point.T.float().contiguous()
    runs = {}
    for name in ("reference", "cuda"):
        w, q, e = W1.clone(), torch.full((B, out), float("nan"), device="cuda"), torch.full((B, out), float("nan"), device="cuda")
        gptq_columns(w, q, e, U, s_rows, z_rows, groups, c0, c1, spec, override=name)
        runs[name] = w, q, e
    (w_r, q_r, e_r), (w_k, q_k, e_k) = runs["reference"], runs["cuda"]
    assert not q_k[c0:c1].isnan().any() and not e_k[c0:c1].isnan().any()  # every row of the range written
    assert q_k[:c0].isnan().all() and q_k[c1:].isnan().all()  # and nothing else
    # the same operations up to torch's reciprocal-multiply for a scalar divisor and FMA contraction:
    # a rounding tie may flip, rarely
    assert (q_k[c0:c1] != q_r[c0:c1]).float().mean() < 1e-3
    torch.testing.assert_close(w_k, w_r, rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("actorder, static", [(None, False), ("group", False), ("weight", False), (None, True)])
def test_gptq_through_the_kernel_equals_the_twin(spec, actorder, static, monkeypatch):
    torch.manual_seed(1)
    out, k = 301, 640 if spec.group_size != 256 else 768
    W = torch.randn(out, k, device="cuda")
    H = _hessian(k, device="cuda", seed=2)
    results = {}
    for name in ("reference", "cuda"):
        monkeypatch.setenv(OVERRIDE_VARIABLE, name)
        results[name] = gptq_quantize(W, H, spec, 0.01, 128, actorder, static)
    ref, ker = results["reference"], results["cuda"]
    assert (ref.weight.q != ker.weight.q).float().mean() < 2e-3
    torch.testing.assert_close(ker.weight.scale, ref.weight.scale, rtol=1e-4, atol=0)  # from the updated columns
    assert abs(ker.loss - ref.loss) <= 2e-3 * ref.loss
    # the kernel is deterministic: the same inputs give the same bits
    again = gptq_quantize(W, H, spec, 0.01, 128, actorder, static)
    assert torch.equal(again.weight.q, ker.weight.q) and torch.equal(again.weight.scale, ker.weight.scale)


@gpu
def test_fp8_and_oversized_blocks_stay_on_the_twin():
    assert select_backend("gptq_columns", "cuda", torch.float32, FloatSpec()).name == "reference"
    W = torch.randn(64, 1024, device="cuda")
    H = _hessian(1024, device="cuda")
    a = gptq_quantize(W, H, IntSpec(4, True, 128), block_size=1024)  # 1024 columns x 32 rows do not fit in shared memory
    assert a.weight.q.shape == (64, 1024)
