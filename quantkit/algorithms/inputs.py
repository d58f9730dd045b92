"""W8A8: the linears' inputs while calibrating.

Static scales (`activations: {dynamic: false}`): InputRanges is an observer
like the roundings'. The driver hands it each input group's calibration inputs
(as the partly quantized model computes them) and it keeps max |x| per group;
a linear's scale is absmax / qmax of the input type, stored in the checkpoint
as `input_scale`. Once a linear is rounded, input_quantizer's hook quantizes its
input as the checkpoint's kernel will, so later layers calibrate on that.
"""

from __future__ import annotations

import torch

from quantkit.errors import NumericalError
from quantkit.formats.activation import ActSpec, fake_quantize, scale_for


class InputRanges:
    """max |x| of each input group's calibration inputs (shared by the group's linears)."""

    def __init__(self, act: ActSpec) -> None:
        self.act = act
        self.absmax: dict[str, torch.Tensor] = {}

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        m = x.detach().abs().amax().to(torch.float32)
        seen = self.absmax.get(names[0])
        value = m if seen is None else torch.maximum(seen, m)
        for name in names:
            self.absmax[name] = value

    def sync(self, groups: list[tuple[tuple[str, ...], int]], comm, device) -> None:
        """The max over every rank (quantkit.distributed); a group no rank saw stays unseen."""
        if comm.alone:
            return
        for names, _ in groups:
            seen = self.absmax.get(names[0])
            both = comm.max_(torch.stack([torch.tensor(float(seen is not None), device=device),
                                          seen.to(device) if seen is not None else torch.zeros((), device=device)]))
            if both[0] > 0:
                for name in names:
                    self.absmax[name] = both[1]

    def scale(self, name: str) -> torch.Tensor:
        """The per-tensor input scale [1] (float32) of linear `name`."""
        if name not in self.absmax:
            raise RuntimeError(f"no calibration input reached {name}: cannot calibrate its static activation scale")
        absmax = self.absmax[name]
        if not torch.isfinite(absmax):
            raise NumericalError(f"the calibration inputs of {name} are not finite")
        return scale_for(absmax, self.act).reshape(1).cpu()

    def report(self, name: str, scale: torch.Tensor) -> dict:
        return {"input_scale": float(scale), "input_absmax": float(self.absmax[name])}


def input_facts(act: ActSpec, scale: torch.Tensor | None, ranges: InputRanges | None, name: str) -> dict:
    facts = {"activations": f"{act.type} {'dynamic per-token' if act.dynamic else 'static per-tensor'}"}
    if scale is not None:
        facts |= ranges.report(name, scale)
    return facts


def input_quantizer(act: ActSpec, scale: torch.Tensor | None):
    """A forward pre-hook quantizing a linear's input as the checkpoint's kernel will."""

    def hook(_module, args):
        return (fake_quantize(args[0], act, scale), *args[1:])

    return hook
