"""The two contracts an algorithm implements, and the registry that names them.

The driver (quantkit.pipeline) walks the model block by block; an algorithm
sees one input group (the linears sharing one input: q/k/v, gate/up) at a time.

    Transform   observes the FLOAT block; per family mapping proposes
                per-input-channel scales, which the driver folds into the op
                before (quantkit.algorithms.folding); then may clip each weight.
                AWQ, SmoothQuant.
    Rounding    observes a group's inputs (as the partly quantized block computes
                them), rounds the group's weights to QuantizedWeights. RTN, GPTQ.

    Rotation    rewrites the model's weights before any calibration, into an equal
                function whose activations have no outlier channels (orthogonal
                rotations of the residual stream, quantkit.algorithms.rotation);
                needs no data, one block at a time as the driver reads it.

A recipe is zero or more rotations, then zero or more transforms, then exactly one
rounding (a Chain). All
kinds hold their statistics per linear and drop them in free(name), add their
facts to a linear's report row (report(name)), and summarize the rows of a whole
run for the CLI (summarize(rows) -> [(label, text)]).

Adding an algorithm = one file with a class decorated by @register, plus one
import line in algorithms/__init__.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from quantkit.distributed import ALONE, Group
from quantkit.formats import ActSpec, FloatSpec, IntSpec, QuantizedWeight, fake_quantize
from quantkit.parsing import shown
from quantkit.recipe import AlgorithmStep, Recipe, RecipeError, parse_dataclass

WeightSpec = IntSpec | FloatSpec

Rounder = Callable[[list[torch.Tensor], torch.Tensor, list[WeightSpec]], list[torch.Tensor]]
"""(weights sharing one input, that input's Hessian, specs) -> the dequantized float32
weights a rounding would make of them, nothing stored: how a transform checks its
choice against the rounding that will actually run."""


class Observer(Protocol):
    """Anything the driver hands calibration inputs to."""

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        """x [tokens, in]: one batch of the input the linears `names` share."""


@dataclass(frozen=True)
class NoOptions:
    """For algorithms that take no options."""


@dataclass
class Scales:
    """A transform's proposal for one mapping."""

    scales: torch.Tensor  # [in] float32: the linears' columns are multiplied by it, the op before divided
    alpha: float | None  # the exponent chosen; None: leave the mapping unscaled (nothing is folded)


class Step(ABC):
    """What both kinds share: a name, typed options, per-linear report facts."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    weight_specs: ClassVar[tuple[type, ...]] = (IntSpec,)  # the weight formats it works on (FP8: FloatSpec)

    def __init__(self, options, activations: ActSpec | None = None) -> None:
        self.options = options
        self.activations = activations  # the recipe's input quantization (W8A8); None: 16-bit inputs

    def check(self, recipe: Recipe) -> None:
        """RecipeError when this step cannot serve `recipe` (by default: its weight format)."""
        if not isinstance(recipe.weights, self.weight_specs):
            fits = sorted(n for n, c in ALGORITHMS.items() if isinstance(recipe.weights, c.weight_specs))
            raise RecipeError(f"recipe {shown(recipe.name)}: algorithm {self.name!r} works on integer weights only; "
                              f"FP8 weights ({recipe.scheme}) take {', '.join(fits)}")

    def report(self, name: str) -> dict:
        """This step's facts about linear `name` for its report row (JSON-able)."""
        return {}

    def free(self, name: str) -> None:
        """Drop whatever is kept for linear `name`."""

    def sync(self, groups: list[tuple[tuple[str, ...], int]], comm, device) -> None:
        """Several processes (quantkit.distributed): combine what each observed of these input
        groups ((names, input width), in the same order on every rank), so that every rank holds
        what one process observing all the batches would. Nothing to do for a step that keeps
        no statistics; one that keeps InputStatistics calls its sync."""
        stats = getattr(self, "_stats", None)
        if stats is not None:
            stats.sync(groups, comm, device)

    @classmethod
    def summarize(cls, rows: list[dict]) -> list[tuple[str, str]]:
        """(label, text) lines for the quantize summary, from a whole run's report rows."""
        return []


def tie(values: torch.Tensor, tied: torch.Tensor | None, reduce: str) -> torch.Tensor:
    """values [in] reduced ("amax" or "mean") over the channels that share a scale and expanded back:
    channel c gets the reduction over every channel d with tied[d] == tied[c] (tied None: values)."""
    if tied is None:
        return values
    tied = tied.to(values.device)
    width = int(tied.max()) + 1
    out = torch.zeros(width, dtype=values.dtype, device=values.device)
    out = out.scatter_reduce(0, tied, values, reduce=reduce, include_self=False)
    return out[tied]


class Transform(Step):
    """Observes the float block, proposes per-channel scales per mapping, may clip weights."""

    # proposes scales shared by tied channels (propose_scales' `tied`): under grouped-query
    # attention, the query heads of a group read one value head, so v -> o folds only so
    ties_channels: ClassVar[bool] = False

    @abstractmethod
    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        """x [tokens, in]: the float block's input to the linears `names`."""

    @abstractmethod
    def propose_scales(self, names: list[str], weights: list[torch.Tensor], specs: list[WeightSpec],
                       rounder: Rounder | None, tied: torch.Tensor | None = None) -> Scales:
        """Scales for linears sharing one input; rounder: the rounding's trial round, when it has one.
        tied [in] (only for a transform that ties_channels): channels c and d must get one scale
        when tied[c] == tied[d] (they are one channel of the op before)."""

    def folded(self, names: list[str], s: torch.Tensor) -> None:
        """The driver folded s in: these linears' input is now x / s."""

    def skipped(self, names: list[str], reason: str) -> None:
        """A mapping over these linears could not be applied (recorded in the report)."""

    def clip(self, name: str, weight: torch.Tensor, spec: WeightSpec, rounder: Rounder | None) -> torch.Tensor:
        """The weight with clipped ranges (as it is, by default)."""
        return weight


class Rotation(Step):
    """Rewrites the float model into an equal function before anything observes it."""

    @abstractmethod
    def prepare(self, loaded) -> None:
        """Rotate `loaded` (a quantkit.models.LoadedModel): every module now, or, for a lazy
        model, each module as it is read (LoadedModel.on_materialize)."""

    def online_linears(self, model) -> dict[str, int]:
        """Module name -> Hadamard block of each linear whose input is rotated at run time (none here)."""
        return {}


class Rounding(Step):
    """Rounds each input group's weights; may observe the group's inputs first."""

    observes: ClassVar[bool] = False  # the driver runs calibration data through the blocks only if asked
    # round_group can spread each group's output rows over several processes (`share`), each
    # rounding its rows against the same statistics, and give every one the whole result
    splits_rows: ClassVar[bool] = False

    @property
    def sequential(self) -> bool:
        """Observe each input group only after the groups before it are rounded (true-sequential)."""
        return False

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        """x [tokens, in]: the input of the linears `names`, as the partly quantized block computes it."""

    @abstractmethod
    def round_group(self, names: list[str], weights: list[torch.Tensor], specs: list[WeightSpec],
                    share: Group = ALONE) -> list[QuantizedWeight]:
        """Round linears that share one input (q/k/v; gate/up), in order. share: the processes
        that round this group together, each its share of the rows (splits_rows only)."""

    def trial_rounder(self) -> Rounder | None:
        """A Rounder when this rounding compensates errors across columns (GPTQ): what it makes of a
        weight then differs from round-to-nearest, and transforms confirm their choices with it.
        None: round-to-nearest scores are right (the default)."""
        return None

    def actorder(self) -> str | None:
        """compressed-tensors' actorder label for the checkpoint."""
        return None


def round_to_nearest(weights: list[torch.Tensor], H: torch.Tensor, specs: list[WeightSpec]) -> list[torch.Tensor]:
    """The Rounder of plain round-to-nearest (H unused)."""
    return [fake_quantize(w.to(torch.float32), spec) for w, spec in zip(weights, specs)]


# --------------------------------------------------------------------------- registry and chains

ALGORITHMS: dict[str, type[Step]] = {}


def register(cls: type[Step]) -> type[Step]:
    if cls.name in ALGORITHMS:
        raise RuntimeError(f"algorithm {cls.name!r} registered twice")
    ALGORITHMS[cls.name] = cls
    return cls


@dataclass
class Chain:
    """A recipe's algorithms: transforms in order, then the rounding."""

    transforms: list[Transform]
    rounding: Rounding
    rotations: list[Rotation] = field(default_factory=list)

    def __iter__(self) -> Iterator[Step]:
        yield from self.rotations
        yield from self.transforms
        yield self.rounding

    @property
    def observes(self) -> bool:
        """Whether any step needs calibration inputs."""
        return bool(self.transforms) or self.rounding.observes

    def summarize(self, rows: list[dict]) -> list[tuple[str, str]]:
        seen, lines = set(), []
        for step in self:
            if type(step) not in seen:
                seen.add(type(step))
                lines += type(step).summarize(rows)
        return lines


def build(step: AlgorithmStep, activations: ActSpec | None = None) -> Step:
    if step.name not in ALGORITHMS:
        raise RecipeError(f"unknown algorithm {shown(step.name)}; available: {', '.join(sorted(ALGORITHMS))}")
    cls = ALGORITHMS[step.name]
    return cls(parse_dataclass(cls.Options, step.kwargs(), f"algorithm {step.name!r}"), activations)


def build_all(recipe: Recipe) -> Chain:
    """The recipe's chain: transforms, then exactly one rounding, last."""
    steps = [build(step, recipe.activations) for step in recipe.algorithms]
    for step in steps:
        step.check(recipe)
    if sum(isinstance(s, Rounding) for s in steps) != 1 or not isinstance(steps[-1], Rounding):
        roundings = sorted(n for n, c in ALGORITHMS.items() if issubclass(c, Rounding))
        raise RecipeError(f"recipe {shown(recipe.name)}: algorithms must end with exactly one rounding step "
                          f"({', '.join(roundings)}); got {[s.name for s in steps]}")
    rotations = [s for s in steps if isinstance(s, Rotation)]
    if steps[: len(rotations)] != rotations:
        raise RecipeError(f"recipe {shown(recipe.name)}: rotations ({', '.join(s.name for s in rotations)}) come first, "
                          f"before every other algorithm; got {[s.name for s in steps]}")
    return Chain(transforms=list(steps[len(rotations):-1]), rounding=steps[-1], rotations=rotations)
