"""W8A8: the linears' inputs while calibrating.

Static scales (`activations: {dynamic: false}`): InputRanges is an observer
like the roundings'. The driver hands it each input group's calibration inputs
(as the partly quantized model computes them) and it keeps max |x| per group;
a linear's scale is absmax / qmax of the input type, stored in the checkpoint
as `input_scale`. Once a linear is rounded, input_quantizer's hook quantizes its
input as the checkpoint's kernel will, so later layers calibrate on that.

With `observer: mse` (int8) it also keeps a histogram of |x| on log-spaced bins
(BINS_PER_OCTAVE to each factor of two, so every magnitude is resolved to a few
percent whatever the range), and the scale is the one whose clipping range c
minimizes the inputs' expected squared error, summed over every calibration value:

    |x| < s/2          rounds to zero          error x^2
    s/2 <= |x| <= c    rounds on the grid      error s^2 / 12   (s = c / 127.5)
    |x| > c            saturates               error (|x| - c)^2

searched over c = absmax * 2^(-k / CLIP_STEPS_PER_OCTAVE). One value far beyond
the rest (an attention sink's input) then no longer sets the step every other
token is rounded with; it is clipped instead, which the sum weighs against the
finer steps. (llm-compressor's mse observer searches such a range on each batch
and averages them as it goes; here one histogram holds every batch.)
"""

from __future__ import annotations

import torch

from quantkit.errors import NumericalError
from quantkit.formats.activation import INT8_HALF_RANGE, ActSpec, fake_quantize, scale_for


LOG2_LOW, LOG2_HIGH, BINS_PER_OCTAVE = -40, 40, 16  # the mse observer's bins of |x|
CLIP_STEPS_PER_OCTAVE, CLIP_OCTAVES = 16, 16  # its clipping ranges: absmax down to absmax / 2^16


class InputRanges:
    """max |x| of each input group's calibration inputs (shared by the group's linears), and with
    observer mse their histogram of |x| (module docstring)."""

    def __init__(self, act: ActSpec) -> None:
        self.act = act
        self.absmax: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}  # observer mse: float64 [bins] per group

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        a = x.detach().abs()
        m = a.amax().to(torch.float32)
        seen = self.absmax.get(names[0])
        value = m if seen is None else torch.maximum(seen, m)
        for name in names:
            self.absmax[name] = value
        if self.act.observer == "mse":
            counts = histogram(a)
            seen = self.counts.get(names[0])
            counts = counts if seen is None else seen + counts
            for name in names:
                self.counts[name] = counts

    def sync(self, groups: list[tuple[tuple[str, ...], int]], comm, device) -> None:
        """The max (and the histograms' sum) over every rank (quantkit.distributed); a group no
        rank saw stays unseen."""
        if comm.alone:
            return
        for names, _ in groups:
            seen = self.absmax.get(names[0])
            both = comm.max_(torch.stack([torch.tensor(float(seen is not None), device=device),
                                          seen.to(device) if seen is not None else torch.zeros((), device=device)]))
            if self.act.observer == "mse":
                counts = self.counts.get(names[0])
                counts = comm.sum_(counts.to(device) if counts is not None else torch.zeros(_bins(), dtype=torch.float64,
                                                                                           device=device)).cpu()
            if both[0] > 0:
                for name in names:
                    self.absmax[name] = both[1]
                    if self.act.observer == "mse":
                        self.counts[name] = counts

    def scale(self, name: str) -> torch.Tensor:
        """The per-tensor input scale [1] (float32) of linear `name`."""
        if name not in self.absmax:
            raise RuntimeError(f"no calibration input reached {name}: cannot calibrate its static activation scale")
        absmax = self.absmax[name]
        if not torch.isfinite(absmax):
            raise NumericalError(f"the calibration inputs of {name} are not finite")
        if self.act.observer == "mse":
            absmax = torch.tensor(mse_clip(self.counts[name], float(absmax)))
        return scale_for(absmax, self.act).reshape(1).cpu()

    def report(self, name: str, scale: torch.Tensor) -> dict:
        absmax = float(self.absmax[name])
        facts = {"input_scale": float(scale), "input_absmax": absmax}
        if self.act.observer == "mse":  # the chosen range against the largest input seen
            facts["input_clip_ratio"] = float(scale) * INT8_HALF_RANGE / absmax if absmax > 0 else 1.0
        return facts


def _bins() -> int:
    return (LOG2_HIGH - LOG2_LOW) * BINS_PER_OCTAVE


def histogram(a: torch.Tensor) -> torch.Tensor:
    """float64 [bins] counts of the magnitudes `a` (>= 0) on the log-spaced bins; zeros and
    anything below 2^LOG2_LOW in the first bin, anything above 2^LOG2_HIGH in the last."""
    logs = torch.log2(a.to(torch.float32).flatten().clamp_min(2.0 ** LOG2_LOW))
    return torch.histc(logs, bins=_bins(), min=LOG2_LOW, max=LOG2_HIGH).to(torch.float64).cpu()


def mse_clip(counts: torch.Tensor, absmax: float) -> float:
    """The int8 clipping range (<= absmax) with the least expected squared error over the
    histogram `counts` (module docstring); absmax itself when nothing was seen."""
    counts = counts.to("cpu", torch.float64)
    if absmax <= 0 or float(counts.sum()) == 0:
        return absmax
    b = torch.arange(counts.numel(), dtype=torch.float64)
    v = torch.pow(2.0, LOG2_LOW + (b + 0.5) / BINS_PER_OCTAVE)[None]  # each bin's middle magnitude
    k = torch.arange(CLIP_STEPS_PER_OCTAVE * CLIP_OCTAVES + 1, dtype=torch.float64)
    c = (absmax * torch.pow(2.0, -k / CLIP_STEPS_PER_OCTAVE))[:, None]  # [clips, 1], absmax first
    s = c / INT8_HALF_RANGE
    err = torch.where(v > c, (v - c) ** 2, torch.where(v < s / 2, v ** 2, s ** 2 / 12))
    total = (err * counts[None]).sum(dim=1)
    return float(c[int(torch.argmin(total)), 0])  # the first of equal minima: the widest range


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
