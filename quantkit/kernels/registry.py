"""The one backend registry of every kernel op: int_weight, w8a8, rms_norm_matmul and the engine ops.

An op is one entry point (quantkit.kernels.int_weight_matmul, engine_ops.add_rms_norm, ...);
its backends are implementations of that entry point's signature, registered where they are
written:

    @register_backend("add_rms_norm", "cuda", available=half_on_gpu)   # engine_ops_cuda.py
    def _add_rms_norm(x, residual, weight, eps): ...

Backend names: "reference" (torch, any device: the twin every other backend is tested
against, registered for every op), "cuda" (csrc/ kernels through CuPy), "torch" (torch's own
CUDA kernels: W8A8's _int_mm / _scaled_mm).

`select_backend(op, device, dtype, spec, override)` is the one choice rule: `override` when it
names a backend that is available for the work (else a ValueError), without one the first
available of FASTEST_FIRST, else "reference". Ops on a prepared weight choose once, when the
weight is prepared (the layout belongs to the backend), and later calls find the weight's
backend by name (`backend(op, name)`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# (device, compute dtype or None when not known yet, what the op must take or None) -> can it run.
# `spec` is the integer format for int_weight / rms_norm_matmul, the weight in the reference
# layout for w8a8 (its shape and types decide), None for the engine ops.
Available = Callable[[torch.device, torch.dtype | None, Any], bool]

FASTEST_FIRST = ("cuda", "torch")  # without an override, the first of these that is available, else "reference"


def anywhere(device: torch.device, dtype: torch.dtype | None, spec: Any) -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    run:       the op, with its entry point's signature
    available: whether it can run the work (see Available)
    prepare:   ops on a weight only: the on-disk tensors (int_weight) or the reference
               layout (w8a8) -> this backend's layout, once, at load time
    """

    op: str
    name: str
    run: Callable[..., Any]
    available: Available = anywhere
    prepare: Callable[..., Any] | None = None


_BACKENDS: dict[str, dict[str, Backend]] = {}  # op -> name -> backend, in registration order


def register_backend(op: str, name: str, *, available: Available = anywhere,
                     prepare: Callable[..., Any] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the function is backend `name` of `op` (registering a name again replaces it)."""
    def register(run: Callable[..., Any]) -> Callable[..., Any]:
        _BACKENDS.setdefault(op, {})[name] = Backend(op, name, run, available, prepare)
        return run
    return register


def backends(op: str) -> dict[str, Backend]:
    """The backends registered for `op`, by name (a copy)."""
    return dict(_BACKENDS.get(op, {}))


def backend(op: str, name: str) -> Backend:
    """Backend `name` of `op`; a ValueError listing the registered ones when there is none."""
    found = _BACKENDS.get(op, {}).get(name)
    if found is None:
        raise ValueError(f"unknown {op} backend {name!r}; available: {', '.join(_BACKENDS.get(op, {}))}")
    return found


def select_backend(op: str, device: torch.device | str, dtype: torch.dtype | None = None, spec: Any = None,
                   override: str | None = None) -> Backend:
    """The backend of `op` for work of `spec` in `dtype` on `device`: `override` when given (a
    ValueError when it is unknown or not available for the work), else the first available
    of FASTEST_FIRST, else "reference"."""
    device = device if isinstance(device, torch.device) else torch.device(device)
    if override is not None:
        chosen = backend(op, override)
        if not chosen.available(device, dtype, spec):
            raise ValueError(f"{op} backend {override!r} is not available on {device} for {spec}"
                             + (f" in {dtype}" if dtype is not None else ""))
        return chosen
    registered = _BACKENDS.get(op, {})
    for name in FASTEST_FIRST:
        candidate = registered.get(name)
        if candidate is not None and candidate.available(device, dtype, spec):
            return candidate
    return backend(op, "reference")
