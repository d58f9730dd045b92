"""Run-time compiled CUDA kernels from csrc/, through CuPy.

`module(name)` compiles csrc/<name>.cu once per process (NVRTC; CuPy also keeps
compiled binaries on disk, so later processes skip the compile) for the current
GPU and returns the CuPy RawModule. Kernels are launched on PyTorch's current
stream with torch tensors' device pointers: no copies between the libraries.

`available()` says whether this machine can run them (CuPy importable and a
CUDA GPU present); callers fall back to the torch reference twin otherwise.

Programmatic dependent launch (Hopper and later): a kernel launched with
`dependent=True` may start while the kernel before it on the stream is still
running, and must itself execute `griddepcontrol.wait` (pdl_wait() in the .cu)
before it reads anything an earlier kernel writes or writes anything at all. What
comes before the wait overlaps the previous kernel's tail: the launch itself, and
for the decode kernel the first loads of its weights. QUANTKIT_PDL=0 turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import re
import struct

import numpy as np
import torch

from quantkit.resources import csrc_dir

CSRC = csrc_dir()
_LOCAL_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')


@functools.cache
def available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None


# Modules that use Hopper's architecture-specific instructions (wgmma): compiled for sm_90a, and only
# on a GPU of compute capability 9.0 (quantkit.kernels.cuda.arch_specific_ok says whether this one is).
ARCH_SPECIFIC = {"int_weight_wgmma", "int_weight_wgmma_ws"}


def source(name: str) -> str:
    """csrc/<name>.cu with each `#include "file"` of csrc/ pasted in place (once per file), so that
    the text CuPy compiles, and keys its binary cache on, holds every line the kernels depend on."""
    seen: set[str] = set()

    def expand(text: str) -> str:
        lines = []
        for line in text.split("\n"):
            match = _LOCAL_INCLUDE.match(line)
            if match is None:
                lines.append(line)
            elif match.group(1) not in seen:
                seen.add(match.group(1))
                lines.append(expand((CSRC / match.group(1)).read_text()))
        return "\n".join(lines)

    return expand((CSRC / f"{name}.cu").read_text())


def arch_specific_ok() -> bool:
    """Whether the modules of ARCH_SPECIFIC run here: a GPU of compute capability 9.0 (Hopper)."""
    return available() and torch.cuda.get_device_capability() == (9, 0)


@functools.cache
def module(name: str):
    """The compiled RawModule of csrc/<name>.cu (cached per process)."""
    import cupy

    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}" + ("a" if name in ARCH_SPECIFIC else "")
    return cupy.RawModule(code=source(name), options=("--std=c++17", f"--gpu-architecture={arch}"),
                          name_expressions=None)


def launch(kernel_name: str, module_name: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple,
           shared_mem: int = 0, dependent: bool = False) -> None:
    """Launch `kernel_name` of csrc/<module_name>.cu on PyTorch's current stream.
    Tensor arguments are passed as device pointers; ints as 64-bit (long) or
    32-bit (int) per the kernel's signature, given here as numpy scalars;
    `shared_mem`: bytes of dynamic shared memory (past 48 KB the kernel is allowed that much
    first, up to what the GPU gives a block). `dependent`:
    the kernel waits for its predecessor itself (pdl_wait), so it may be launched
    early (programmatic dependent launch, where the GPU has it)."""
    kernel = _function(module_name, kernel_name)
    if shared_mem > _DEFAULT_SHARED - _STATIC_SHARED_MARGIN:
        _allow_shared(module_name, kernel_name, shared_mem)
    stream = torch.cuda.current_stream().cuda_stream
    if dependent and _pdl():
        _launch_ex(kernel.kernel.ptr, grid, block, args, shared_mem, stream)
        return
    with _stream(stream):
        kernel(grid, block, tuple(_arg(a) for a in args), shared_mem=shared_mem)


_DEFAULT_SHARED = 48 * 1024  # shared memory (static + dynamic) a kernel may take without opting in
_STATIC_SHARED_MARGIN = 1024  # past _DEFAULT_SHARED less this much dynamic memory, opt in (static variables count too)
_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


@functools.cache
def _allow_shared(module_name: str, kernel_name: str, shared_mem: int) -> None:
    """Lets the kernel launch with `shared_mem` bytes of dynamic shared memory (the opt-in past 48 KB)."""
    function = _function(module_name, kernel_name).kernel.ptr
    err = _driver().cuFuncSetAttribute(ctypes.c_void_p(function), _MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_mem)
    if err:
        raise RuntimeError(f"{kernel_name} cannot take {shared_mem} bytes of shared memory (CUresult {err})")


# ---- programmatic dependent launch through the driver's cuLaunchKernelEx ----------------------------
class _AttrValue(ctypes.Union):  # CUlaunchAttributeValue: a 64-byte union
    _fields_ = [("pad", ctypes.c_char * 64), ("align", ctypes.c_void_p), ("flag", ctypes.c_int)]


class _Attr(ctypes.Structure):  # CUlaunchAttribute
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttrValue)]


class _Config(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attr)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
# numpy scalar type -> its struct code, padded to an 8-byte slot
_FORMATS = {"uint64": "Q", "int64": "q", "int32": "ixxxx", "uint32": "Ixxxx", "float32": "fxxxx"}


@functools.cache
def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.cuLaunchKernelEx.restype = ctypes.c_int
    lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.cuFuncSetAttribute.restype = ctypes.c_int
    return lib


pdl_enabled = os.environ.get("QUANTKIT_PDL", "1") != "0"  # benchmarks flip it to compare


def _pdl() -> bool:
    return pdl_enabled and _pdl_supported()


@functools.cache
def _pdl_supported() -> bool:
    """Programmatic dependent launch: compute capability 9.0 or later and the driver's cuLaunchKernelEx."""
    if torch.cuda.get_device_capability()[0] < 9:
        return False
    try:
        _driver()
    except (OSError, AttributeError):
        return False
    return True


@functools.cache
def _slot_format(kind: type) -> str:
    return _FORMATS[kind.__name__]


def _launch_ex(function: int, grid, block, args, shared_mem: int, stream: int) -> None:
    grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
    attr = _Attr(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value.flag = 1
    config = _Config((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem, stream,
                     ctypes.pointer(attr), 1)
    # the arguments' values in one buffer, 8 bytes apart, and the array of pointers into it
    # (one ctypes object per argument would cost more than the launch)
    values = [_arg(a) for a in args]
    try:
        fmt = "<" + "".join([_slot_format(type(v)) for v in values])
    except (AttributeError, KeyError):
        raise TypeError("kernel arguments must be tensors or numpy int32/int64/uint32/uint64/float32 scalars, got "
                        + ", ".join(type(v).__name__ for v in values)) from None
    buf = ctypes.create_string_buffer(struct.pack(fmt, *values), 8 * len(values))
    base = ctypes.addressof(buf)
    params = (ctypes.c_void_p * len(values))(*range(base, base + 8 * len(values), 8))
    err = _driver().cuLaunchKernelEx(ctypes.byref(config), function, params, None)
    if err:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {err}")


_counters: dict[tuple[str, torch.device], list[torch.Tensor]] = {}


def counters(owner: str, device: torch.device, count: int) -> torch.Tensor:
    """At least `count` zeroed int32 counters through which `owner`'s kernels find the last block
    of a split to arrive (that block resets its own, so they are zero between launches). Grown
    arrays are kept alive: a CUDA graph captured earlier still holds the old pointer."""
    held = _counters.setdefault((owner, device), [])
    if not held or held[-1].numel() < count:
        held.append(torch.zeros(max(count, 4096), dtype=torch.int32, device=device))
    return held[-1]


@functools.cache
def resident_blocks(kernel_name: str, module_name: str, threads: int, shared_mem: int) -> int:
    """How many blocks of this launch shape one multiprocessor holds at once (CUDA's occupancy calculator)."""
    from cupy_backends.cuda.api import driver

    kernel = _function(module_name, kernel_name)  # a cupy RawKernel; its CUDA function is .kernel
    if shared_mem > _DEFAULT_SHARED - _STATIC_SHARED_MARGIN:
        _allow_shared(module_name, kernel_name, shared_mem)
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
    if isinstance(a, torch.Tensor):
        if not a.is_cuda:
            raise ValueError(f"CUDA kernel argument on {a.device}, expected a CUDA tensor")
        return np.uint64(a.data_ptr())
    return a
