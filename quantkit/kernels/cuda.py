"""Run-time compiled CUDA kernels from csrc/, through CuPy.

`module(name)` compiles csrc/<name>.cu once per process (NVRTC; CuPy also keeps
compiled binaries on disk, so later processes skip the compile) for the current
GPU and returns the CuPy RawModule. Kernels are launched on PyTorch's current
stream with torch tensors' device pointers: no copies between the libraries.

`available()` says whether this machine can run them (CuPy importable and a
CUDA GPU present); callers fall back to the torch reference twin otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"


@functools.cache
def available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None


@functools.cache
def module(name: str):
    """The compiled RawModule of csrc/<name>.cu (cached per process)."""
    import cupy

    source = (CSRC / f"{name}.cu").read_text()
    major, minor = torch.cuda.get_device_capability()
    return cupy.RawModule(code=source, options=("--std=c++17", f"--gpu-architecture=sm_{major}{minor}"),
                          name_expressions=None)


def launch(kernel_name: str, module_name: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple,
           shared_mem: int = 0) -> None:
    """Launch `kernel_name` of csrc/<module_name>.cu on PyTorch's current stream.
    Tensor arguments are passed as device pointers; ints as 64-bit (long) or
    32-bit (int) per the kernel's signature, given here as numpy scalars;
    `shared_mem`: bytes of dynamic shared memory (at most 48 KB)."""
    kernel = _function(module_name, kernel_name)
    with _stream(torch.cuda.current_stream().cuda_stream):
        kernel(grid, block, tuple(_arg(a) for a in args), shared_mem=shared_mem)


@functools.cache
def resident_blocks(kernel_name: str, module_name: str, threads: int, shared_mem: int) -> int:
    """How many blocks of this launch shape one multiprocessor holds at once (CUDA's occupancy calculator)."""
    from cupy_backends.cuda.api import driver

    kernel = _function(module_name, kernel_name)  # a cupy RawKernel; its CUDA function is .kernel
    return max(1, driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, threads, shared_mem))


@functools.cache
def _function(module_name: str, kernel_name: str):
    return module(module_name).get_function(kernel_name)


@functools.cache
def _stream(handle: int):
    """CuPy's view of a CUDA stream PyTorch owns (one object per stream, reused)."""
    import cupy

    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        try:
            return from_external(_TorchStream(handle))
        except (TypeError, AttributeError):
            pass
    return cupy.cuda.ExternalStream(handle)


class _TorchStream:
    """The CUDA stream protocol (__cuda_stream__) over a raw stream handle."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


def _arg(a):
    import numpy as np

    if isinstance(a, torch.Tensor):
        if not a.is_cuda:
            raise ValueError(f"CUDA kernel argument on {a.device}, expected a CUDA tensor")
        return np.uint64(a.data_ptr())
    return a
