"""Recipes: what to quantize, how, and with which calibration data.

A recipe is a YAML file under ``recipes/`` (named by its file stem, e.g.
``w4a16-rtn``; benchmark variants under ``recipes/ablations/`` by
``ablations/<stem>``) or anywhere else (named by its path)::

    name: w4a16-rtn                  # defaults to the file stem
    description: 4-bit weights, group 128, symmetric, round-to-nearest
    scheme: W4A16                    # preset: W2A16, W3A16, W4A16, W8A16, W8A8-INT8, W8A8-FP8, W4A8-INT8
    weights: {group_size: 128, symmetric: true}   # IntSpec (FloatSpec for FP8) fields over the preset
    activations: {dynamic: true}     # W8A8 / W4A8 schemes only: ActSpec fields over the preset
    algorithms: [rtn]                # in order; `- gptq: {dampening: 0.01}` passes options
    targets: [".*"]                  # regexes, re.search on the full linear name
    ignore: [lm_head]                # regexes; ignore wins over targets
    overrides:                       # later overrides win
      - {pattern: "mlp\\.down_proj$", weights: {bits: 8}}
    calibration: {data: mix, num_samples: 128, seqlen: 512, seed: 0}   # or 'austen@0.5,./notes.txt@0.5'
    check: {windows: 4, max_ratio: 10}   # held-back perplexity check after quantizing

Every key is optional except that a recipe built from a plain dict needs a
``name``. Unknown keys, wrong types and bad values raise :class:`RecipeError`
naming the file, the key and the value (cut short when long), and listing the
valid choices. A recipe file is at most MAX_RECIPE_BYTES of UTF-8 plain YAML:
no anchors or aliases, tags or deep nesting (see quantkit.parsing).

:func:`parse_dataclass` is the strict parser behind this; algorithms reuse it
for their own frozen option dataclasses (``parse_dataclass(GPTQOptions,
step.kwargs(), "algorithm 'gptq'")``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import typing
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from quantkit.calibration import parse_mix
from quantkit.formats.activation import ActSpec
from quantkit.formats.spec import FloatSpec, IntSpec
from quantkit.parsing import (
    RecipeError, child_path, convert_value, cut, dump_yaml, init_fields, load_yaml_mapping, parse_dataclass, shown,
    wrong_type,
)
from quantkit.resources import recipes_dir

__all__ = [
    "ABLATIONS", "ACTIVATIONS", "MAX_RECIPE_BYTES", "RECIPES_DIR", "SCHEMES", "AlgorithmStep", "CalibrationConfig",
    "CheckConfig", "LayerOverride", "Recipe", "RecipeError", "list_recipes", "load_recipe", "parse_dataclass",
]

RECIPES_DIR = recipes_dir()  # quantkit.resources: package data, or recipes/ in a checkout
# the subfolder of RECIPES_DIR holding benchmark variants: loadable as "ablations/<stem>",
# listed by list_recipes(ablations=True), not among the recipes `quantkit recipes` offers
ABLATIONS = "ablations"
# a recipe is a few hundred bytes; the cap keeps a wrong file (or a huge one
# copied into every checkpoint) from being parsed at all
MAX_RECIPE_BYTES = 1 << 20
# sizes and counts a run can hold in a tensor index; larger ones are typos
MAX_COUNT = 2**31 - 1

# scheme name -> the weight spec it stands for; a recipe's `weights:` edits it.
SCHEMES: dict[str, IntSpec | FloatSpec] = {
    "W2A16": IntSpec(bits=2, symmetric=True, group_size=128),
    "W3A16": IntSpec(bits=3, symmetric=True, group_size=128),
    "W4A16": IntSpec(bits=4, symmetric=True, group_size=128),
    "W8A16": IntSpec(bits=8, symmetric=True, group_size=None),
    # W8A8: the int8 / FP8 tensor-core matmuls take per-channel (or per-tensor)
    # symmetric weights and per-token (dynamic) or per-tensor (static) inputs
    "W8A8-INT8": IntSpec(bits=8, symmetric=True, group_size=None),
    "W8A8-FP8": FloatSpec("channel"),
    # W4A8: int4 weights in groups (or per channel), symmetric, with int8 inputs: compressed-tensors'
    # preset W4A8, stored int-quantized (one int8 per value); our reader dequantizes the weight
    "W4A8-INT8": IntSpec(bits=4, symmetric=True, group_size=128),
}
# scheme name -> how the linears' inputs are quantized (None: kept in 16 bits);
# a recipe's `activations:` edits it
ACTIVATIONS: dict[str, ActSpec | None] = {
    "W8A8-INT8": ActSpec("int8", dynamic=True),
    "W8A8-FP8": ActSpec("fp8", dynamic=True),
    "W4A8-INT8": ActSpec("int8", dynamic=True),
}


# --------------------------------------------------------------------------- recipe parts

def _check_regex(pattern: str, what: str) -> None:
    if not isinstance(pattern, str):
        raise RecipeError(f"{what} must be a regex string, got {shown(pattern)}")
    try:
        with warnings.catch_warnings():  # "possible nested set" and the like: the pattern compiles
            warnings.simplefilter("ignore")
            re.compile(pattern)
    # re.error for bad syntax, but also OverflowError (a{99999999999}), RecursionError
    # (thousands of nested groups), MemoryError: every one is a pattern that cannot be used
    except Exception as e:
        raise RecipeError(f"{what}: invalid regex {shown(pattern)}: {cut(str(e) or type(e).__name__, 120)}") from e


def _check_group_size(spec: IntSpec | FloatSpec, what: str) -> None:
    # IntSpec takes any positive size; past this the group count rounds to zero
    # (576 / 10**400 == 0.0) or overflows the tensors' int64 shapes
    if spec.group_size is not None and spec.group_size > MAX_COUNT:
        raise RecipeError(f"{what}: group_size must be at most {MAX_COUNT}, got {shown(spec.group_size)}")


def _freeze_option(key: str, value, algo: str):
    # options travel as YAML scalars or (nested) lists; lists become tuples so a step is hashable
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_freeze_option(key, v, algo) for v in value)
    raise RecipeError(f"option {shown(key)} of algorithm {shown(algo)} must be a YAML scalar or list, "
                      f"got {shown(value)} ({type(value).__name__})")


def _thaw(value):
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def _sorted_items(items, what: str) -> tuple[tuple[str, object], ...]:
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise RecipeError(f"{what}: expected a mapping, got {shown(items)}")
    for k, _ in pairs:
        if not isinstance(k, str) or not k:
            raise RecipeError(f"{what}: keys must be non-empty strings, got {shown(k)}")
    dup = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    if dup:
        raise RecipeError(f"{what}: duplicate key {shown(dup[0])}")
    return tuple(sorted(pairs, key=lambda p: p[0]))  # by key alone: values need not compare


@dataclass(frozen=True)
class AlgorithmStep:
    """One algorithm in the recipe's chain; YAML ``- rtn`` or ``- gptq: {dampening: 0.01}``."""

    name: str
    options: tuple[tuple[str, object], ...] = ()  # sorted (key, value); lists stored as tuples

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise RecipeError(f"algorithm name must be a non-empty identifier, got {shown(self.name)}")
        what = f"options of algorithm {shown(self.name)}"
        items = _sorted_items(self.options, what)
        object.__setattr__(self, "options",
                           tuple((k, _freeze_option(k, v, self.name)) for k, v in items))

    def kwargs(self) -> dict:
        return dict(self.options)

    @classmethod
    def from_yaml_data(cls, data, where: str) -> AlgorithmStep:
        if isinstance(data, str):
            return cls(data)
        if isinstance(data, Mapping) and len(data) == 1:
            (name, options), = data.items()
            if options is None:
                options = {}
            if not isinstance(options, Mapping):
                raise RecipeError(f"{where}: options of algorithm {shown(name)} must be a mapping, "
                                  f"got {shown(options)}")
            try:
                return cls(name, options)
            except RecipeError as e:
                raise RecipeError(f"{where}: {e}") from e
        raise RecipeError(f"{where}: expected an algorithm name (e.g. rtn) or a one-key mapping "
                          f"(e.g. {{gptq: {{dampening: 0.01}}}}), got {shown(data)}")

    def to_yaml_data(self):
        return {self.name: {k: _thaw(v) for k, v in self.options}} if self.options else self.name


_SPEC_FIELDS = {f.name: f for f in dataclasses.fields(IntSpec)}


@dataclass(frozen=True)
class LayerOverride:
    """Replace some weight-spec fields on the linears whose full name matches `pattern`."""

    pattern: str
    weights: tuple[tuple[str, object], ...]  # sorted partial IntSpec fields

    def __post_init__(self):
        _check_regex(self.pattern, "override pattern")
        what = f"override {shown(self.pattern)} weights"
        if isinstance(self.weights, Mapping) and not self.weights:
            raise RecipeError(f"{what}: sets no field; valid keys: {', '.join(sorted(_SPEC_FIELDS))}")
        items = _sorted_items(self.weights, what)
        if not items:
            raise RecipeError(f"{what}: sets no field; valid keys: {', '.join(sorted(_SPEC_FIELDS))}")
        hints = typing.get_type_hints(IntSpec)
        checked = []
        for key, value in items:
            if key not in _SPEC_FIELDS:
                raise RecipeError(f"unknown key {shown(key)} in {what}; valid keys: "
                                  + ", ".join(sorted(_SPEC_FIELDS)))
            checked.append((key, convert_value(value, hints[key], f"{what}: {key}")))
        object.__setattr__(self, "weights", tuple(checked))

    def apply(self, spec: IntSpec) -> IntSpec:
        return dataclasses.replace(spec, **dict(self.weights))


@dataclass(frozen=True)
class MoECalibration:
    """How the experts of a mixture-of-experts model are calibrated (quantkit.experts).

    observe: what each expert's rounding (GPTQ's Hessian, static input ranges) observes.
      routed: the calibration tokens the router sends it, what it sees at inference;
      all:    every calibration token, through every expert, for observation only (the block's
              output, which the next blocks calibrate on, stays the routed one): rarely chosen
              experts are calibrated on as many tokens as the others.
    min_tokens: an expert whose rounding observed fewer tokens is rounded to nearest instead, with
      a report line. The default 16: a Hessian of a few tokens has a rank of a few, and GPTQ then
      fits those tokens at the expense of every direction it never saw, which round-to-nearest
      does not bet on; no expert of a usual calibration set comes near it (128 x 512 tokens, top-2
      of 8 experts: 16,384 tokens on average), so it catches the starved ones only. At least 1:
      an expert that saw no token has nothing to round by.
    """

    observe: typing.Literal["routed", "all"] = "routed"
    min_tokens: int = 16

    def __post_init__(self):
        if not 1 <= self.min_tokens <= MAX_COUNT:
            raise ValueError(f"min_tokens must be in 1..{MAX_COUNT} (an expert that observed no token has no "
                             f"statistics to round by), got {shown(self.min_tokens)}")


@dataclass(frozen=True)
class CalibrationConfig:
    # bundled corpus name, local path, hub dataset name, or a mix of them ("austen@0.5,./notes.txt@0.5");
    # the default "mix": equal shares of literature, documentation, source code and dialogue
    data: str = "mix"
    num_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    # dtype of the calibration forwards (the weights are always rounded from the
    # model's own): auto = bfloat16 for a float32 model where the hardware multiplies
    # it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 / AMX / Arm BF16:
    # quantkit.devices), else the model's dtype; the choice is recorded in the report
    dtype: typing.Literal["auto", "model", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = 8  # calibration samples per block forward
    # keep each finished sub-module's outputs (norms, attention, linears) for the
    # later passes over a block instead of recomputing them: faster, at the cost
    # of about a dozen activation-sized buffers per block; false when memory is short
    replay: bool = True
    moe: MoECalibration = MoECalibration()  # mixture-of-experts models only
    # conversations in the data written with the tokenizer's chat template, as a served chat model
    # sees them: auto = where the tokenizer has one; true = required; false = turns as plain lines
    chat_template: typing.Literal["auto", True, False] = "auto"

    def __post_init__(self):
        parse_mix(self.data)  # the mix's spelling (weights, repeats); each part is read at run time
        if self.chat_template not in ("auto", True, False):
            raise ValueError(f"chat_template must be auto, true or false, got {shown(self.chat_template)}")
        for key in ("num_samples", "seqlen", "batch_size"):
            if not 0 < getattr(self, key) <= MAX_COUNT:
                raise ValueError(f"{key} must be in 1..{MAX_COUNT}, got {shown(getattr(self, key))}")
        if not -(2**63) <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ValueError(f"seed must be in -2**63..2**64-1, got {shown(self.seed)}")


@dataclass(frozen=True)
class CheckConfig:
    """The check after quantizing (quantkit.heldout): perplexity of the quantized
    and the float model on `windows` calibration windows held back from
    calibration. A NaN, or a ratio above `max_ratio`, refuses to write the
    checkpoint. The bound catches a broken model, not a lossy one: 3-bit
    round-to-nearest can multiply a small model's perplexity by several times."""

    windows: int = 4  # 0: no check
    # 4 x 256 tokens: two forwards of 1,024 tokens (float and quantized), enough to see a blow-up
    seqlen: int | None = 256  # None: the calibration seqlen; capped at the model's context either way
    max_ratio: float = 10.0

    def __post_init__(self):
        if not 0 <= self.windows <= MAX_COUNT:
            raise ValueError(f"windows must be in 0..{MAX_COUNT} (0: no check), got {shown(self.windows)}")
        if self.seqlen is not None and not 2 <= self.seqlen <= MAX_COUNT:
            raise ValueError(f"seqlen must be in 2..{MAX_COUNT}, got {shown(self.seqlen)}")
        if not self.max_ratio >= 1.0:  # NaN fails too
            raise ValueError(f"max_ratio must be a number >= 1, got {self.max_ratio}")


_CANDIDATE = re.compile(r"w(\d+)(?:g(\d+))?|16")


@dataclass(frozen=True)
class BudgetConfig:
    """Mixed precision under a size budget (quantkit.budget): each targeted linear gets the
    candidate format that minimizes the model's total predicted output error while the linears'
    bytes (packed values, scales, zero points, as the report counts them) stay within
    bits_per_weight bits per weight on average.

    candidates: "wBgG" (B bits, groups of G; the recipe's symmetry), "wB" (B bits, one scale per
    output channel), "16" (left in 16 bits). The default ladder steps finely around 4 bits (W4 per
    channel, g128, g64, g32) so that an upgrade of one linear can be paid for by a small step down
    of others, not only by W3 (BENCHMARKS.md: at uniform W4's size, gradient sensitivity, the choice
    from W3 g64 / W4 g128 / W4 g64 / W8 lost to uniform W4 in perplexity; the ladder's won).

    sensitivity: "output" scores a candidate by the squared error it adds to its linear's own
    output; "gradient" weighs each output channel's error by the mean squared gradient of the
    model's loss with respect to that channel (one backward pass over gradient_samples
    calibration windows, the whole model in memory), so an error is scored by what it does to
    the model's next-token loss, downstream layers included; "measured" scales each linear's
    output error by what rounding that linear alone (round-to-nearest, the `reference` candidate)
    does to the model's output, measured: the KL divergence of its next-token distribution from the
    float model's over measured_samples calibration windows, per unit of the output error the
    rounding added there (one forward of those windows per targeted linear, the whole model in
    memory). reference: a candidate name; empty: size_of, or the one whose nominal bits per weight
    (bits plus 16 / group size) are nearest bits_per_weight.

    size_of: a candidate instead of bits_per_weight: the budget is the bytes that format would take
    on every targeted linear (the uniform recipe's size, whatever the model's shapes and the
    scales' dtype), so "as small as uniform W4 g128" needs no arithmetic."""

    bits_per_weight: float | None = None
    size_of: str = ""
    candidates: tuple[str, ...] = ("w3g64", "w4", "w4g128", "w4g64", "w4g32", "w8", "16")
    sensitivity: typing.Literal["output", "gradient", "measured"] = "output"
    gradient_samples: int = 32
    measured_samples: int = 16
    reference: str = ""

    def __post_init__(self):
        if (self.bits_per_weight is None) == (not self.size_of):
            raise ValueError("give the budget as bits_per_weight (a number) or as size_of (a candidate), one of the two")
        if self.bits_per_weight is not None and not 1.0 <= self.bits_per_weight <= 32.0:  # NaN fails too
            raise ValueError(f"bits_per_weight must be in 1..32, got {shown(self.bits_per_weight)}")
        if self.size_of and (self.size_of not in self.candidates or self.size_of == "16"):
            raise ValueError(f"size_of {shown(self.size_of)} must be one of the quantized candidates "
                             f"({', '.join(c for c in self.candidates if c != '16')})")
        if not self.candidates:
            raise ValueError("candidates must list at least one format, e.g. [w4g128, w8]")
        if self.sensitivity not in ("output", "gradient", "measured"):
            raise ValueError(f"sensitivity must be output, gradient or measured, got {shown(self.sensitivity)}")
        for key in ("gradient_samples", "measured_samples"):
            if not 1 <= getattr(self, key) <= MAX_COUNT:
                raise ValueError(f"{key} must be in 1..{MAX_COUNT}, got {shown(getattr(self, key))}")
        if self.reference and (self.reference not in self.candidates or self.reference == "16"):
            raise ValueError(f"reference {shown(self.reference)} must be one of the quantized candidates "
                             f"({', '.join(c for c in self.candidates if c != '16')})")
        if self.sensitivity == "measured" and all(c == "16" for c in self.candidates):
            raise ValueError("sensitivity measured needs a quantized candidate to measure with")
        for c in self.candidates:
            m = _CANDIDATE.fullmatch(c) if isinstance(c, str) else None
            if m is None or (m.group(1) is not None and int(m.group(1)) not in (2, 3, 4, 8)) or \
                    (m.group(2) is not None and int(m.group(2)) < 1):
                raise ValueError(f"candidate {shown(c)}: expected wB (B in 2, 3, 4, 8: one scale per output "
                                 f"channel), wBgG (groups of G) or 16")

    def reference_candidate(self) -> str:
        """The candidate sensitivity "measured" rounds with (the class docstring)."""
        if self.reference or self.size_of:
            return self.reference or self.size_of

        def nominal(c: str) -> float:
            m = _CANDIDATE.fullmatch(c)
            return int(m.group(1)) + (16 / int(m.group(2)) if m.group(2) else 0.0)

        return min((c for c in self.candidates if c != "16"), key=lambda c: abs(nominal(c) - self.bits_per_weight))

    def specs(self, base: IntSpec) -> dict[str, IntSpec | None]:
        """Candidate name -> its weight spec (the recipe's symmetry), None for 16 bits."""
        out = {}
        for c in self.candidates:
            m = _CANDIDATE.fullmatch(c)
            out[c] = None if c == "16" else dataclasses.replace(
                base, bits=int(m.group(1)), group_size=int(m.group(2)) if m.group(2) else None)
        return out


# --------------------------------------------------------------------------- the recipe

@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    scheme: str = "W4A16"
    weights: IntSpec | FloatSpec = IntSpec()  # SCHEMES[scheme] with the YAML `weights:` mapping applied
    activations: ActSpec | None = None  # ACTIVATIONS[scheme] with the YAML `activations:` mapping applied
    algorithms: tuple[AlgorithmStep, ...] = (AlgorithmStep("rtn"),)
    targets: tuple[str, ...] = (r".*",)
    ignore: tuple[str, ...] = (r"lm_head",)
    overrides: tuple[LayerOverride, ...] = ()
    calibration: CalibrationConfig = CalibrationConfig()
    check: CheckConfig = CheckConfig()
    # a layer whose input width is not a multiple of group_size (SmolLM2: 576 vs 128):
    #   shrink: halve the group size until it divides (>= 16) -- loads everywhere
    #   keep:   a partial last group -- quantkit reads it; transformers and vLLM do not
    #   error:  refuse
    partial_groups: typing.Literal["shrink", "keep", "error"] = "shrink"
    budget: BudgetConfig | None = None  # mixed precision under a size budget (weight-only schemes)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError(f"name must be a non-empty string, got {shown(self.name)}")
        if not isinstance(self.scheme, str) or self.scheme not in SCHEMES:
            raise RecipeError(f"unknown scheme {shown(self.scheme)}; valid schemes: {', '.join(SCHEMES)}")
        preset, act_preset = SCHEMES[self.scheme], ACTIVATIONS.get(self.scheme)
        if type(self.weights) is not type(preset):
            raise RecipeError(f"scheme {self.scheme!r} takes {type(preset).__name__} weights, got {self.weights}")
        if act_preset is None and self.activations is not None:
            raise RecipeError(f"scheme {self.scheme!r} keeps activations in 16 bits; for quantized activations "
                              f"use scheme {' or '.join(ACTIVATIONS)}")
        if act_preset is not None:
            self._check_w8a8(act_preset)
        preset_bits = preset.bits
        if self.weights.bits != preset_bits:
            fits = [s for s, spec in SCHEMES.items() if spec.bits == self.weights.bits]
            raise RecipeError(f"weights.bits {self.weights.bits} contradicts scheme {self.scheme!r} "
                              f"({preset_bits} bits); use scheme {' or '.join(fits) or '?'}, or "
                              f"per-layer overrides for mixed precision")
        if self.budget is not None and not isinstance(self.weights, IntSpec) or \
                self.budget is not None and self.activations is not None:
            raise RecipeError(f"budget: mixed precision is for weight-only integer schemes (W2A16 ... W8A16), "
                              f"not {self.scheme}")
        if not self.algorithms:
            raise RecipeError("algorithms must list at least one step, e.g. [rtn]")
        if not self.targets:
            raise RecipeError("targets must list at least one regex, e.g. ['.*']")
        for key in ("targets", "ignore"):
            for i, pattern in enumerate(getattr(self, key)):
                _check_regex(pattern, f"{key}[{i}]")
        _check_group_size(self.weights, "weights")
        for i, override in enumerate(self.overrides):
            what = f"overrides[{i}] ({shown(override.pattern)})"
            try:
                spec = override.apply(self.weights)
            except (ValueError, TypeError) as e:
                raise RecipeError(f"{what}: {cut(str(e))}") from e
            _check_group_size(spec, what)

    def _check_w8a8(self, act_preset: ActSpec) -> None:
        if self.activations is None:
            raise RecipeError(f"scheme {self.scheme!r} quantizes activations: `activations` must be a mapping "
                              f"such as {{dynamic: true}}, not null")
        if self.activations.type != act_preset.type:
            raise RecipeError(f"scheme {self.scheme!r} takes {act_preset.type} activations, got {self.activations.type}")
        per_channel = SCHEMES[self.scheme].group_size is None  # W8A8-INT8: what int8 tensor-core matmuls take
        if isinstance(self.weights, IntSpec) and per_channel and \
                (self.weights.group_size is not None or not self.weights.symmetric):
            raise RecipeError(f"scheme {self.scheme!r} takes per-channel symmetric int8 weights (what int8 "
                              f"tensor-core matmuls take, one weight scale per output row): set "
                              f"weights.group_size: null and weights.symmetric: true; for weights in groups "
                              f"use scheme W4A8-INT8")
        if isinstance(self.weights, IntSpec) and self.weights.scale_dtype is not None:
            raise RecipeError(f"scheme {self.scheme!r}: weights.scale_dtype is for weight-only schemes (the int8 "
                              f"kernels take their scales in the model's dtype); remove it")
        if isinstance(self.weights, IntSpec) and not self.weights.symmetric:
            # int-quantized would store a zero point per group, which no int8-input kernel here subtracts
            raise RecipeError(f"scheme {self.scheme!r} takes symmetric weights with quantized activations: "
                              f"set weights.symmetric: true")
        if self.overrides:
            raise RecipeError(f"scheme {self.scheme!r}: per-layer overrides are for weight-only schemes; "
                              f"keep a layer in 16 bits with `ignore`")

    def spec_for(self, layer_name: str, in_features: int | None = None) -> IntSpec | FloatSpec | None:
        """The weight spec for linear `layer_name` (full module name), or None to
        leave it float. With `in_features`, the partial_groups policy applies."""
        if not any(re.search(p, layer_name) for p in self.targets):
            return None
        if any(re.search(p, layer_name) for p in self.ignore):
            return None
        spec = self.weights
        for override in self.overrides:  # later overrides win
            if re.search(override.pattern, layer_name):
                spec = override.apply(spec)
        gs = spec.group_size
        if in_features is None or gs is None or in_features % gs == 0 or self.partial_groups == "keep":
            return spec
        if self.partial_groups == "shrink":
            g = gs
            while g >= 32 and g % 2 == 0:
                g //= 2
                if in_features % g == 0:
                    return dataclasses.replace(spec, group_size=g)
        raise RecipeError(
            f"{layer_name}: {in_features} input features are not a multiple of group_size {gs}"
            + (" and no smaller group size >= 16 divides them" if self.partial_groups == "shrink" else "")
            + "; choose another group_size, or set partial_groups: keep (readable by quantkit only)"
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "scheme": self.scheme,
            "weights": init_fields(self.weights),  # complete, so the preset is irrelevant
            **({"activations": init_fields(self.activations)} if self.activations is not None else {}),
            "algorithms": [step.to_yaml_data() for step in self.algorithms],
            "targets": list(self.targets),
            "ignore": list(self.ignore),
            "overrides": [{"pattern": o.pattern, "weights": dict(o.weights)} for o in self.overrides],
            "calibration": init_fields(self.calibration) | {"moe": init_fields(self.calibration.moe)},
            "check": init_fields(self.check),
            "partial_groups": self.partial_groups,
            **({"budget": init_fields(self.budget) | {"candidates": list(self.budget.candidates)}}
               if self.budget is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "recipe") -> Recipe:
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where}: the top level must be a mapping, got {type(data).__name__}")
        data = dict(data)
        scheme = data.get("scheme", "W4A16")
        if not isinstance(scheme, str) or scheme not in SCHEMES:
            raise RecipeError(f"{child_path(where, 'scheme')}: unknown scheme {shown(scheme)}; "
                              f"valid schemes: {', '.join(SCHEMES)}")
        preset = SCHEMES[scheme]
        if "weights" in data:
            edits = data["weights"]
            if isinstance(edits, (IntSpec, FloatSpec)):
                edits = init_fields(edits)
            if not isinstance(edits, Mapping):
                raise wrong_type(edits, type(preset), child_path(where, "weights"))
            data["weights"] = parse_dataclass(type(preset), {**init_fields(preset), **edits}, child_path(where, "weights"))
        else:
            data["weights"] = preset
        act_preset = ACTIVATIONS.get(scheme)
        if "activations" in data:
            edits = data["activations"]
            if isinstance(edits, ActSpec):
                edits = init_fields(edits)
            if edits is not None and act_preset is None:
                raise RecipeError(f"{child_path(where, 'activations')}: scheme {scheme!r} keeps activations in "
                                  f"16 bits; for quantized activations use scheme {' or '.join(ACTIVATIONS)}")
            if edits is not None and not isinstance(edits, Mapping):
                raise wrong_type(edits, ActSpec, child_path(where, "activations"))
            if edits is not None:
                data["activations"] = parse_dataclass(ActSpec, {**init_fields(act_preset), **edits},
                                                      child_path(where, "activations"))
        else:
            data["activations"] = act_preset
        if "algorithms" in data:
            steps = data["algorithms"]
            if not isinstance(steps, list):
                raise RecipeError(f"{child_path(where, 'algorithms')}: expected a list such as [rtn], "
                                  f"got {shown(steps)}")
            data["algorithms"] = [AlgorithmStep.from_yaml_data(s, child_path(child_path(where, "algorithms"), i))
                                  for i, s in enumerate(steps)]
        if "overrides" in data:
            items = data["overrides"]
            if not isinstance(items, list):
                raise RecipeError(f"{child_path(where, 'overrides')}: expected a list of "
                                  f"{{pattern: ..., weights: {{...}}}}, got {shown(items)}")
            data["overrides"] = [_parse_override(o, child_path(child_path(where, "overrides"), i))
                                 for i, o in enumerate(items)]
        return parse_dataclass(cls, data, where)

    @classmethod
    def from_yaml(cls, text: str, where: str = "recipe", default_name: str | None = None) -> Recipe:
        if not isinstance(text, str):
            raise RecipeError(f"{where}: recipe text must be a str, got {type(text).__name__}")
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{where}: {_over_the_cap(size)}")
        data = load_yaml_mapping(text, where)
        if default_name is not None and "name" not in data:
            data = {"name": default_name, **data}
        return cls.from_dict(data, where)

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


def _parse_override(data, where: str) -> LayerOverride:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: expected {{pattern: ..., weights: {{...}}}}, got {shown(data)}")
    for key in data:
        if key not in ("pattern", "weights"):
            raise RecipeError(f"unknown key {shown(key)} in {where}; valid keys: pattern, weights")
    for key in ("pattern", "weights"):
        if key not in data:
            raise RecipeError(f"{where}: missing key {key!r}")
    if not isinstance(data["weights"], Mapping):
        raise wrong_type(data["weights"], IntSpec, child_path(where, "weights"))
    try:
        return LayerOverride(data["pattern"], data["weights"])
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from e


# --------------------------------------------------------------------------- recipe files

def _shipped_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


_NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _shipped_in_folder(text: str) -> Path | None:
    """The shipped file a name like "ablations/int8-gptq" stands for (a stem in a subfolder
    of RECIPES_DIR, no .yaml suffix), when it exists and no such relative path does."""
    parts = text.split("/")
    if len(parts) != 2 or not all(_NAME_PART.fullmatch(part) for part in parts) or text.endswith((".yaml", ".yml")):
        return None
    path = RECIPES_DIR / parts[0] / f"{parts[1]}.yaml"
    try:
        return path if path.is_file() and not Path(text).exists() else None
    except OSError:  # a name too long for the filesystem: the path reading below says so
        return None


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """Load a shipped recipe by name ("w4a16-rtn", "ablations/int8-gptq": the file's path
    under RECIPES_DIR without .yaml) or any recipe file by path (a relative path that
    exists wins over a shipped name)."""
    text = str(name_or_path)
    is_path = (isinstance(name_or_path, os.PathLike) or "/" in text or "\\" in text
               or text.endswith((".yaml", ".yml")))
    in_folder = None if isinstance(name_or_path, os.PathLike) else _shipped_in_folder(text)
    if in_folder is not None:
        is_path, path = False, in_folder
    else:
        path = Path(name_or_path) if is_path else RECIPES_DIR / f"{text}.yaml"
    missing = (f"recipe file {shown(str(path), 200)} does not exist" if is_path
               else f"no recipe named {shown(text)}")
    body = _read_recipe_file(path, f"{missing}; shipped recipes: {', '.join(_shipped_names()) or '(none)'}")
    return Recipe.from_yaml(body, where=_path_shown(path), default_name=path.stem)


def _read_recipe_file(path: Path, missing: str) -> str:
    """The text of recipe file `path`: a regular file of at most MAX_RECIPE_BYTES
    (checked before reading it whole) of UTF-8; RecipeError (`missing` when there
    is no such file) for anything else."""
    where = _path_shown(path)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise RecipeError(missing) from None
    except (OSError, ValueError) as e:  # no permission on a folder above, a name too long, a NUL byte
        raise RecipeError(f"cannot read recipe file {where}: {_reason(e)}") from e
    if stat.S_ISDIR(mode):
        raise RecipeError(f"recipe file {where} is a folder, not a file")
    if not stat.S_ISREG(mode):  # a FIFO would block the read, a device may never end
        raise RecipeError(f"recipe file {where} is not a regular file")
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_RECIPE_BYTES:
                raise RecipeError(f"recipe file {where}: {_over_the_cap(size)}")
            data = f.read(MAX_RECIPE_BYTES + 1)  # the file may have grown since
    except OSError as e:
        raise RecipeError(f"cannot read recipe file {where}: {_reason(e)}") from e
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe file {where}: {_over_the_cap(f'more than {MAX_RECIPE_BYTES:,}')}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecipeError(f"recipe file {where} is not UTF-8 text: byte {data[e.start:e.start + 1]!r} at "
                          f"line {line}; save it as UTF-8") from None


def _over_the_cap(size: int | str) -> str:
    return (f"{size if isinstance(size, str) else f'{size:,}'} bytes, over the {MAX_RECIPE_BYTES:,}-byte limit "
            f"for a recipe (a recipe is a few hundred bytes: is this the right file?)")


def _path_shown(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 200 else f"...{text[-200:]}"  # the end names the file


def _reason(error: Exception) -> str:
    return cut(error.strerror if isinstance(error, OSError) and error.strerror else str(error), 120)


def list_recipes(ablations: bool = False) -> list[tuple[str, str]]:
    """(name, description) of every recipe directly under RECIPES_DIR, sorted by name; with
    `ablations`, also the benchmark variants under RECIPES_DIR/ablations ("ablations/<stem>").
    The name is what load_recipe takes."""
    named = [(p.stem, p) for p in RECIPES_DIR.glob("*.yaml")]
    if ablations:
        named += [(f"{ABLATIONS}/{p.stem}", p) for p in (RECIPES_DIR / ABLATIONS).glob("*.yaml")]
    return sorted((name, load_recipe(path).description) for name, path in named)
