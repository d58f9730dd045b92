"""The one backend-choice rule every kernel entry point shares."""

from __future__ import annotations

from collections.abc import Callable, Mapping


def choose_backend(backends: Mapping[str, object], preferred: tuple[str, ...], takes: Callable[[object], bool],
                   override: str | None, what: str, refusal: str) -> str:
    """`override` when it names a registered backend that `takes` the work (else a
    ValueError: unknown, listing the registered ones; or `refusal`); without one,
    the first of `preferred` that is registered and takes it, else "reference"."""
    if override is not None:
        if override not in backends:
            raise ValueError(f"unknown {what} backend {override!r}; available: {', '.join(backends)}")
        if not takes(backends[override]):
            raise ValueError(refusal)
        return override
    return next((name for name in preferred if name in backends and takes(backends[name])), "reference")
