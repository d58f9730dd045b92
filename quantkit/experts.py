"""Calibrating a mixture-of-experts layer so that no expert is left behind.

The driver (quantkit.pipeline) walks a sparse layer like any block; what is particular to the
experts lives here:

  stages         each expert's input groups form their own stage(s), so the rounding's statistics
                 (GPTQ's Hessians) of one expert live at a time;
  what is seen   the tokens routed to each expert (counted by quantkit.models.moe.Experts in the
                 pass that observes it) and the tokens its rounding observed: the routed ones, or
                 with calibration.moe.observe: all, every calibration token (ObservedTokens);
  the fallback   an expert whose rounding observed fewer than calibration.moe.min_tokens tokens
                 is rounded to nearest instead (a Hessian of a few tokens fits those tokens, not
                 the expert's inputs), and with static activations its input range comes from
                 every calibration token, so it is never left without a finite scale;
  the report     each expert linear's row says how many tokens it was routed and observed, and
                 why it fell back; summary_lines sums them up for the CLI.

Transforms (AWQ, SmoothQuant) observe the float block with every token through every expert:
their scales for the norm -> experts mapping must suit every token the router reads, and an
expert's own scales are then never left without statistics.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field

import torch

from quantkit.algorithms.folding import Target
from quantkit.models.families import Family
from quantkit.recipe import MoECalibration

FALLBACK = "rtn"  # what a starved expert is rounded with


def expert_index(family: Family, rel: str) -> int | None:
    """The routed expert a linear (name relative to its block) belongs to; None outside the experts."""
    if family.moe is None:
        return None
    m = re.match(re.escape(family.moe.experts) + r"\.(\d+)\.", rel)
    return int(m.group(1)) if m else None


def experts_of(family: Family, groups: list[list[Target]]) -> set[int]:
    return {e for g in groups if (e := expert_index(family, g[0].rel)) is not None}


def split_stages(family: Family, groups: list[list[Target]]) -> list[list[list[Target]]]:
    """Observation stages for a rounding that observes every group before rounding any (not
    true-sequential): the groups before the experts together, then each expert's groups on their
    own, so that one expert's statistics live at a time. (The experts are then observed with the
    block's attention already rounded, as a true-sequential rounding observes them.)"""
    stages: list[list[list[Target]]] = []
    last: object = object()
    for group in groups:
        e = expert_index(family, group[0].rel)
        if stages and (e == last if e is not None else last is None):
            stages[-1].append(group)
        else:
            stages.append([group])
        last = e
    return stages


class ObservedTokens:
    """An observer counting the calibration tokens each input group's linears observed."""

    def __init__(self) -> None:
        self.tokens: dict[str, int] = {}

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        for name in names:
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

    def sync(self, groups: list[tuple[tuple[str, ...], int]], comm, device) -> None:
        """Counts summed over every rank (quantkit.distributed)."""
        if comm.alone:
            return
        names = [n for g, _ in groups for n in g]
        total = comm.sum_(torch.tensor([self.tokens.get(n, 0) for n in names], dtype=torch.int64, device=device))
        self.tokens.update({n: int(t) for n, t in zip(names, total.tolist()) if t or n in self.tokens})


@dataclass
class LayerExperts:
    """One sparse layer's expert calibration: the routed counts seen so far, and per linear what
    its rounding observed. `rounding_observes`: whether the recipe's rounding reads statistics
    (GPTQ: a starved expert falls back; RTN: nothing to fall back from)."""

    family: Family
    options: MoECalibration
    rounding_observes: bool
    routed: dict[int, int] = field(default_factory=dict)  # expert -> tokens routed to it
    observed: ObservedTokens = field(default_factory=ObservedTokens)
    ranged_on_all: set[int] = field(default_factory=set)  # starved experts whose static input range saw every token

    def observe_all(self, stage: list[list[Target]]) -> set[int]:
        """The experts of `stage` that run on every token while it is observed."""
        return experts_of(self.family, stage) if self.options.observe == "all" else set()

    def count(self, routed: torch.Tensor | None, experts: set[int]) -> None:
        """Keep the routed counts of `experts` from a pass that observed them."""
        if routed is not None:
            self.routed.update({e: int(routed[e]) for e in experts})

    def starved(self, stage: list[list[Target]]) -> set[int]:
        """The experts of `stage` whose rounding observed fewer than min_tokens tokens."""
        if not self.rounding_observes:
            return set()
        return {e for g in stage if (e := expert_index(self.family, g[0].rel)) is not None
                and self.observed.tokens.get(g[0].name, 0) < self.options.min_tokens}

    def falls_back(self, group: list[Target]) -> bool:
        return expert_index(self.family, group[0].rel) in self.starved([group])

    def facts(self, target: Target) -> dict:
        """The report entries of an expert linear (none for the other linears)."""
        e = expert_index(self.family, target.rel)
        if e is None:
            return {}
        out = {"moe_expert": e}
        if e in self.routed:
            out["moe_tokens_routed"] = self.routed[e]
        if self.rounding_observes:
            seen = self.observed.tokens.get(target.name, 0)
            out["moe_tokens_observed"] = seen
            if seen < self.options.min_tokens:
                out["moe_fallback"] = (f"rounded to nearest: its rounding observed {seen} calibration tokens, fewer "
                                       f"than calibration.moe.min_tokens = {self.options.min_tokens}")
        if e in self.ranged_on_all:
            out["moe_input_range"] = "static input range observed on every calibration token"
        return out


def summary_lines(rows: list[dict]) -> list[tuple[str, str]]:
    """(label, text) lines for the quantize summary from the report rows of expert linears."""
    experts = {}
    for r in rows:
        if "moe_expert" in r:
            experts.setdefault(r["name"].rsplit(".", 1)[0], r)  # one row per expert
    if not experts:
        return []
    lines = []
    counted = {name: r["moe_tokens_routed"] for name, r in experts.items() if "moe_tokens_routed" in r}
    if counted:
        low = min(counted, key=counted.get)
        lines.append(("MoE tokens routed", f"{len(experts)} experts: min {counted[low]} ({low}), median "
                                           f"{statistics.median(counted.values()):g}, max {max(counted.values())}"))
    else:
        lines.append(("MoE tokens routed", f"{len(experts)} experts, none counted: the recipe runs no calibration data"))
    observed = [r["moe_tokens_observed"] for r in experts.values() if "moe_tokens_observed" in r]
    if observed:
        lines.append(("MoE tokens observed", f"min {min(observed)}, max {max(observed)} per expert"))
    fallback = sorted({r["name"].rsplit(".", 1)[0] for r in rows if r.get("moe_fallback")})
    if fallback:
        lines.append(("MoE fallback", f"{len(fallback)} experts rounded to nearest (too few calibration tokens): "
                                      + ", ".join(fallback)))
    return lines
