"""float32 matrix products on the CPU through whichever BLAS is faster here.

Calibration is matmul-bound on a CPU: the block forwards and the GPTQ
Hessians are float32 GEMMs. torch calls its bundled MKL; numpy calls its
bundled OpenBLAS. Which one is faster depends on the processor, and not by a
little: on our 2-core Xeon OpenBLAS runs these shapes at 240-280 GFLOP/s and
MKL through torch at 145-160 (BENCHMARKS.md). So the choice is measured once
per process, not assumed, and `QUANTKIT_CPU_GEMM=torch|numpy` overrides it.

Entry points (same results as their torch twins up to float32 rounding):

    linear(x, weight, bias)    F.linear: x [..., in] @ weight[out, in]^T + bias
    add_gram_(H, x, alpha, beta)   H <- beta * H + alpha * x^T x, in place

Anything numpy cannot take as it is (a CUDA tensor, a dtype other than
float32, a tensor that needs grad) goes to torch.
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("torch", "numpy")


def _best_of(fn, repeats: int = 3) -> float:
    fn()  # warm up (thread pools, packing buffers)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@functools.cache
def _measured_backend() -> str:
    """numpy when it multiplies a calibration-sized float32 product clearly faster."""
    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    an, bn = a.numpy(), b.numpy()
    t_torch = _best_of(lambda: a @ b)
    t_numpy = _best_of(lambda: an @ bn)
    return "numpy" if t_numpy * 1.15 < t_torch else "torch"


def backend() -> str:
    """The backend the entry points use for CPU float32 tensors."""
    choice = os.environ.get("QUANTKIT_CPU_GEMM", "auto")
    if choice in BACKENDS:
        return choice
    if choice != "auto":
        raise ValueError(f"QUANTKIT_CPU_GEMM must be auto, torch or numpy, got {choice!r}")
    return _measured_backend()


def _numpy_ok(*tensors: torch.Tensor | None) -> bool:
    return all(
        t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad) for t in tensors
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for x [..., in], weight [out, in], bias [out] or None."""
    if not _numpy_ok(x, weight, bias) or backend() != "numpy":
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    y = np.matmul(x2.numpy(), weight.numpy().T)  # weight^T is a transposed view: BLAS reads it as is
    if bias is not None:
        y += bias.numpy()
    return torch.from_numpy(y).reshape(*x.shape[:-1], weight.shape[0])


def add_gram_(H: torch.Tensor, x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """H [in, in] <- beta * H + alpha * x^T x for x [t, in], in place; returns H."""
    if not _numpy_ok(H, x) or not H.is_contiguous() or backend() != "numpy":
        H.mul_(beta)
        return H.addmm_(x.T, x, alpha=alpha)
    xn = x.numpy()
    gram = xn.T @ xn
    Hn = H.numpy()
    Hn *= beta
    Hn += np.float32(alpha) * gram
    return H
