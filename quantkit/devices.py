"""What the hardware is: which device a run may use, how much memory it has, and
which dtype the calibration forwards take there. Decided from what the machine
says of itself (flags, properties), never from a timing, so the same command on
the same machine always makes the same choices."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch


def check_device(device: str | torch.device) -> torch.device:
    """`device` parsed and checked before any work: cpu, or cuda[:N] with that GPU present."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {str(device)[:80]!r}; valid: cpu, cuda, cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but no CUDA GPU is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def memory_of(dev: torch.device) -> int | None:
    """Bytes of memory on `dev` in all (RAM for the CPU), None where it cannot be told."""
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev.index or 0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: AVX512-BF16 or AMX on x86, the
    BF16 extension on Arm. Read from the CPU's flags, never timed (oneDNN reports
    bf16 "supported" without these too, where it is emulated and runs about 4x
    slower than float32)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell without timing; stay in the model's dtype
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def calibration_dtype(choice: str, model_dtype: torch.dtype, device) -> torch.dtype:
    """The dtype of the calibration forwards for a CalibrationConfig.dtype choice.
    auto: the model's own dtype unless it is float32 and the hardware multiplies
    bf16 natively (a CUDA GPU with bf16, a CPU with bf16 instructions)."""
    if choice == "model":
        return model_dtype
    if choice != "auto":
        return getattr(torch, choice)
    if model_dtype != torch.float32:
        return model_dtype
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else model_dtype
    return torch.bfloat16 if cpu_has_native_bf16() else model_dtype


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux), None where it cannot be told."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int | None:
    """The most resident memory this process has held since it started."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    except (ImportError, OSError):
        return None


def start_gpu_peak(dev: torch.device) -> None:
    """Begin a new window for gpu_peak_bytes on `dev` (nothing on the CPU)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def gpu_peak_bytes(dev: torch.device) -> int | None:
    """The most memory torch's allocator held on `dev` since start_gpu_peak; None on the CPU."""
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
