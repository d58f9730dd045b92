"""The one interface every algorithm implements, and the registry that names them.

The driver (quantkit.pipeline) walks the model; an algorithm only sees one
layer at a time:

    observe(names, x)         x: [tokens, in_features], the calibration input shared
                              by the linears `names` (e.g. q, k and v)
    quantize(name, w, spec)   -> QuantizedWeight (rounding algorithms: rtn, gptq)
    free(name)                drop whatever was kept for `name`

Adding an algorithm = one file with a class decorated by @register, plus one
import line in algorithms/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from quantkit.formats import ActSpec, FloatSpec, IntSpec, QuantizedWeight, fake_quantize
from quantkit.parsing import shown
from quantkit.recipe import AlgorithmStep, Recipe, RecipeError, parse_dataclass


@dataclass(frozen=True)
class NoOptions:
    """For algorithms that take no options."""


class Algorithm:
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    needs_activations: ClassVar[bool] = False  # the driver runs calibration data only if some step needs it
    rounds: ClassVar[bool] = True  # produces the QuantizedWeight (exactly one per recipe, last)
    # transforms the float block before rounding (AWQ: scales folded into the
    # op before, clipping); observes the float block in a pass of its own
    transforms: ClassVar[bool] = False
    # the rounding compensates errors across columns (GPTQ), so what it makes of
    # a weight differs from round-to-nearest: transforms then confirm their
    # choices with trial_round instead of trusting a round-to-nearest score
    error_feedback: ClassVar[bool] = False
    float_weights: ClassVar[bool] = False  # handles FP8 (FloatSpec) weights
    needs_quantized_inputs: ClassVar[bool] = False  # only meaningful for W8A8 schemes (SmoothQuant)
    # the recipe's input quantization (W8A8), set by build_all; None = 16-bit inputs
    activations: ActSpec | None = None

    def __init__(self, options) -> None:
        self.options = options

    sequential: bool = False  # true-sequential: observe each input group after the previous ones are quantized

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        pass

    def quantize(self, name: str, weight: torch.Tensor, spec: IntSpec) -> QuantizedWeight:
        raise NotImplementedError(f"{type(self).__name__} does not round weights")

    def quantize_group(self, names: list[str], weights: list[torch.Tensor], specs: list[IntSpec]) -> list[QuantizedWeight]:
        """Round linears that share one input (q/k/v; gate/up), in order.
        An algorithm that can do them together (one solve) overrides this."""
        return [self.quantize(n, w, s) for n, w, s in zip(names, weights, specs)]

    def trial_round(self, weights: list[torch.Tensor], H: torch.Tensor, specs: list[IntSpec]) -> list[torch.Tensor]:
        """What this rounding would make of linears sharing one input with
        Hessian H: the dequantized float32 weights, nothing stored."""
        return [fake_quantize(w.to(torch.float32), spec) for w, spec in zip(weights, specs)]

    # -- the transform interface (transforms = True), called by the driver per block
    def search_scales(self, names: list[str], weights: list[torch.Tensor], specs: list[IntSpec], rounder=None):
        """Per-input-channel scales for linears sharing one input: an object with
        .scales [in] and .alpha (None: leave them unscaled). rounder: the
        recipe's trial_round when it has error feedback, else None."""
        raise NotImplementedError(f"{type(self).__name__} does not search scales")

    def scaled(self, names: list[str], s: torch.Tensor) -> None:
        """The driver folded s into the op before these linears and their columns."""

    def skip(self, names: list[str], reason: str) -> None:
        """A mapping over these linears could not be applied (recorded in the report)."""

    def clip(self, name: str, weight: torch.Tensor, spec: IntSpec, rounder=None) -> torch.Tensor:
        """The weight with clipped ranges (as it is, by default)."""
        return weight

    def actorder(self) -> str | None:
        """compressed-tensors' actorder label for the checkpoint (rounding steps)."""
        return None

    def layer_report(self, name: str) -> dict:
        """Extra per-layer facts for the quantization report (JSON-able)."""
        return {}

    def free(self, name: str) -> None:
        pass


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    if cls.name in ALGORITHMS:
        raise RuntimeError(f"algorithm {cls.name!r} registered twice")
    ALGORITHMS[cls.name] = cls
    return cls


def build(step: AlgorithmStep) -> Algorithm:
    if step.name not in ALGORITHMS:
        raise RecipeError(f"unknown algorithm {shown(step.name)}; available: {', '.join(sorted(ALGORITHMS))}")
    cls = ALGORITHMS[step.name]
    return cls(parse_dataclass(cls.Options, step.kwargs(), f"algorithm {step.name!r}"))


def build_all(recipe: Recipe) -> list[Algorithm]:
    """The recipe's algorithms in order; exactly one rounding step, and it is last."""
    algorithms = [build(step) for step in recipe.algorithms]
    for a in algorithms:
        a.activations = recipe.activations
        if isinstance(recipe.weights, FloatSpec) and not a.float_weights:
            fits = sorted(n for n, c in ALGORITHMS.items() if c.float_weights)
            raise RecipeError(f"recipe {shown(recipe.name)}: algorithm {a.name!r} rounds integer weights only; "
                              f"FP8 weights ({recipe.scheme}) take {', '.join(fits)}")
        if a.needs_quantized_inputs and recipe.activations is None:
            raise RecipeError(f"recipe {shown(recipe.name)}: {a.name} balances activation outliers for quantized "
                              f"activations, and scheme {recipe.scheme!r} keeps them in 16 bits; use a W8A8 "
                              f"scheme, or awq for weight-only schemes")
    rounding = [a.name for a in algorithms if a.rounds]
    if len(rounding) != 1 or not algorithms[-1].rounds:
        raise RecipeError(
            f"recipe {shown(recipe.name)}: algorithms must end with exactly one rounding step "
            f"({', '.join(sorted(n for n, c in ALGORITHMS.items() if c.rounds))}); got {[a.name for a in algorithms]}"
        )
    return algorithms
