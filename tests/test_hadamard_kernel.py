"""The online rotation's fast Walsh-Hadamard transform (csrc/hadamard.cu) against its torch twin
(quantkit.formats.hadamard.rotate_blocks: the dense block matrix). The kernel tests need a CUDA GPU
and CuPy and skip cleanly without them; the twin is tested everywhere (tests/test_rotation.py)."""

from __future__ import annotations

import pytest
import torch

from quantkit.formats.hadamard import online_hook, rotate_blocks
from quantkit.kernels import cuda, select_backend
from quantkit.kernels.hadamard import hadamard_rows

gpu = pytest.mark.skipif(not cuda.available(), reason="needs a CUDA GPU and CuPy")


def test_the_cpu_takes_the_twin():
    assert select_backend("hadamard", "cpu", torch.float32, 64).name == "reference"
    x = torch.randn(4, 192)
    assert torch.equal(hadamard_rows(x, 64), rotate_blocks(x, 64))
    assert torch.equal(online_hook(64)(None, (x,))[0], rotate_blocks(x, 64))


@gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("rows, blocks, b", [(1, 1, 2), (7, 3, 64), (33, 7, 512), (5, 7, 2048), (3, 2, 8192),
                                            (70001, 1, 128)])
def test_the_kernel_rotates_as_the_twin(dtype, tol, rows, blocks, b):
    torch.manual_seed(rows + b)
    x = torch.randn(rows, blocks * b, device="cuda")
    x[:, 3 % (blocks * b)] *= 300.0  # an outlier channel: what the rotation is for
    x = x.to(dtype)
    assert select_backend("hadamard", "cuda", dtype, b).name == "cuda"
    got = hadamard_rows(x, b)
    exact = rotate_blocks(x.double(), b)  # float64: the rounding of neither path
    assert got.dtype == dtype and got.shape == x.shape and torch.isfinite(got).all()
    err = (got.double() - exact).norm() / exact.norm()
    assert err < tol, f"relative error {err:.2e}"
    twin = rotate_blocks(x, b)  # float32 matmul: TF32 where torch allows it
    assert (got.double() - twin.double()).norm() / exact.norm() < max(2 * tol, 4e-3)


@gpu
def test_strided_and_batched_inputs_and_large_blocks():
    x = torch.randn(2, 9, 4096, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(hadamard_rows(x, 1024), rotate_blocks(x, 1024), rtol=2e-2, atol=2e-2)
    wide = torch.randn(6, 3 * 2048, device="cuda")[:, :2048]  # row stride 6144
    torch.testing.assert_close(hadamard_rows(wide, 2048), rotate_blocks(wide, 2048), rtol=1e-4, atol=1e-5)
    assert select_backend("hadamard", "cuda", torch.float32, 16384).name == "reference"  # beyond shared memory
    assert select_backend("hadamard", "cuda", torch.float32, 96).name == "reference"  # not a power of two
    # twice is the identity (H_b / sqrt(b) is symmetric and orthogonal)
    y = torch.randn(5, 4096, device="cuda")
    torch.testing.assert_close(hadamard_rows(hadamard_rows(y, 4096), 4096), y, rtol=1e-5, atol=1e-5)
