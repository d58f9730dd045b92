"""Recipes: what to quantize, how, and with which calibration data.

A recipe is a YAML file under ``recipes/`` (named by its file stem, e.g.
``w4a16-rtn``) or anywhere else (named by its path)::

    name: w4a16-rtn                  # defaults to the file stem
    description: 4-bit weights, group 128, symmetric, round-to-nearest
    scheme: W4A16                    # preset: W2A16, W3A16, W4A16, W8A16, W8A8-INT8, W8A8-FP8
    weights: {group_size: 128, symmetric: true}   # IntSpec (FloatSpec for FP8) fields over the preset
    activations: {dynamic: true}     # W8A8 schemes only: ActSpec fields over the preset
    algorithms: [rtn]                # in order; `- gptq: {dampening: 0.01}` passes options
    targets: [".*"]                  # regexes, re.search on the full linear name
    ignore: [lm_head]                # regexes; ignore wins over targets
    overrides:                       # later overrides win
      - {pattern: "mlp\\.down_proj$", weights: {bits: 8}}
    calibration: {data: austen, num_samples: 128, seqlen: 512, seed: 0}
    check: {windows: 4, max_ratio: 10}   # held-back perplexity check after quantizing

Every key is optional except that a recipe built from a plain dict needs a
``name``. Unknown keys, wrong types and bad values raise :class:`RecipeError`
naming the file, the key and the value, and listing the valid choices.

:func:`parse_dataclass` is the strict parser behind this; algorithms reuse it
for their own frozen option dataclasses (``parse_dataclass(GPTQOptions,
step.kwargs(), "algorithm 'gptq'")``).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from quantkit.formats.activation import ActSpec
from quantkit.formats.spec import FloatSpec, IntSpec
from quantkit.parsing import RecipeError, child_path, convert_value, init_fields, parse_dataclass, wrong_type

__all__ = [
    "ACTIVATIONS", "RECIPES_DIR", "SCHEMES", "AlgorithmStep", "CalibrationConfig", "CheckConfig", "LayerOverride",
    "Recipe", "RecipeError", "list_recipes", "load_recipe", "parse_dataclass",
]

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"

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
}
# scheme name -> how the linears' inputs are quantized (None: kept in 16 bits);
# a recipe's `activations:` edits it
ACTIVATIONS: dict[str, ActSpec | None] = {
    "W8A8-INT8": ActSpec("int8", dynamic=True),
    "W8A8-FP8": ActSpec("fp8", dynamic=True),
}


# --------------------------------------------------------------------------- recipe parts

def _check_regex(pattern: str, what: str) -> None:
    if not isinstance(pattern, str):
        raise RecipeError(f"{what} must be a regex string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise RecipeError(f"{what}: invalid regex {pattern!r}: {e}") from e


def _freeze_option(key: str, value, algo: str):
    # options travel as YAML scalars or (nested) lists; lists become tuples so a step is hashable
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_freeze_option(key, v, algo) for v in value)
    raise RecipeError(f"option {key!r} of algorithm {algo!r} must be a YAML scalar or list, "
                      f"got {value!r} ({type(value).__name__})")


def _thaw(value):
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def _sorted_items(items, what: str) -> tuple[tuple[str, object], ...]:
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
    keys = [k for k, _ in pairs]
    for k in keys:
        if not isinstance(k, str) or not k:
            raise RecipeError(f"{what}: keys must be non-empty strings, got {k!r}")
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise RecipeError(f"{what}: duplicate key {dup[0]!r}")
    return tuple(sorted(pairs))


@dataclass(frozen=True)
class AlgorithmStep:
    """One algorithm in the recipe's chain; YAML ``- rtn`` or ``- gptq: {dampening: 0.01}``."""

    name: str
    options: tuple[tuple[str, object], ...] = ()  # sorted (key, value); lists stored as tuples

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise RecipeError(f"algorithm name must be a non-empty identifier, got {self.name!r}")
        what = f"options of algorithm {self.name!r}"
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
                raise RecipeError(f"{where}: options of algorithm {name!r} must be a mapping, "
                                  f"got {options!r}")
            try:
                return cls(name, options)
            except RecipeError as e:
                raise RecipeError(f"{where}: {e}") from e
        raise RecipeError(f"{where}: expected an algorithm name (e.g. rtn) or a one-key mapping "
                          f"(e.g. {{gptq: {{dampening: 0.01}}}}), got {data!r}")

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
        what = f"override {self.pattern!r} weights"
        if isinstance(self.weights, Mapping) and not self.weights:
            raise RecipeError(f"{what}: sets no field; valid keys: {', '.join(sorted(_SPEC_FIELDS))}")
        items = _sorted_items(self.weights, what)
        if not items:
            raise RecipeError(f"{what}: sets no field; valid keys: {', '.join(sorted(_SPEC_FIELDS))}")
        hints = typing.get_type_hints(IntSpec)
        checked = []
        for key, value in items:
            if key not in _SPEC_FIELDS:
                raise RecipeError(f"unknown key {key!r} in {what}; valid keys: "
                                  + ", ".join(sorted(_SPEC_FIELDS)))
            checked.append((key, convert_value(value, hints[key], f"{what}: {key}")))
        object.__setattr__(self, "weights", tuple(checked))

    def apply(self, spec: IntSpec) -> IntSpec:
        return dataclasses.replace(spec, **dict(self.weights))


@dataclass(frozen=True)
class CalibrationConfig:
    data: str = "austen"  # bundled corpus name, local path or hub dataset name
    num_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    # dtype of the calibration forwards (the weights are always rounded from the
    # model's own): auto = bfloat16 where the device multiplies it fast (CUDA, or
    # a CPU measured to run bf16 matmuls faster than float32), else the model's dtype
    dtype: typing.Literal["auto", "model", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = 8  # calibration samples per block forward
    # keep each finished sub-module's outputs (norms, attention, linears) for the
    # later passes over a block instead of recomputing them: faster, at the cost
    # of about a dozen activation-sized buffers per block; false when memory is short
    replay: bool = True

    def __post_init__(self):
        if not self.data:
            raise ValueError("data must name a corpus, a path or a dataset, got ''")
        for key in ("num_samples", "seqlen", "batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class CheckConfig:
    """The check after quantizing (quantkit.heldout): perplexity of the quantized
    and the float model on `windows` calibration windows held back from
    calibration. A NaN, or a ratio above `max_ratio`, refuses to write the
    checkpoint. The bound catches a broken model, not a lossy one: 3-bit
    round-to-nearest can multiply a small model's perplexity by several times."""

    windows: int = 4  # 0: no check
    seqlen: int | None = None  # None: the calibration seqlen (capped at the model's context)
    max_ratio: float = 10.0

    def __post_init__(self):
        if self.windows < 0:
            raise ValueError(f"windows must be >= 0 (0: no check), got {self.windows}")
        if self.seqlen is not None and self.seqlen < 2:
            raise ValueError(f"seqlen must be at least 2, got {self.seqlen}")
        if not self.max_ratio >= 1.0:  # NaN fails too
            raise ValueError(f"max_ratio must be a number >= 1, got {self.max_ratio}")


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

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError(f"name must be a non-empty string, got {self.name!r}")
        if self.scheme not in SCHEMES:
            raise RecipeError(f"unknown scheme {self.scheme!r}; valid schemes: {', '.join(SCHEMES)}")
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
        if not self.algorithms:
            raise RecipeError("algorithms must list at least one step, e.g. [rtn]")
        if not self.targets:
            raise RecipeError("targets must list at least one regex, e.g. ['.*']")
        for key in ("targets", "ignore"):
            for i, pattern in enumerate(getattr(self, key)):
                _check_regex(pattern, f"{key}[{i}]")
        for i, override in enumerate(self.overrides):
            try:
                override.apply(self.weights)
            except (ValueError, TypeError) as e:
                raise RecipeError(f"overrides[{i}] ({override.pattern!r}): {e}") from e

    def _check_w8a8(self, act_preset: ActSpec) -> None:
        if self.activations is None:
            raise RecipeError(f"scheme {self.scheme!r} quantizes activations: `activations` must be a mapping "
                              f"such as {{dynamic: true}}, not null")
        if self.activations.type != act_preset.type:
            raise RecipeError(f"scheme {self.scheme!r} takes {act_preset.type} activations, got {self.activations.type}")
        if isinstance(self.weights, IntSpec) and (self.weights.group_size is not None or not self.weights.symmetric):
            raise RecipeError(f"scheme {self.scheme!r} takes per-channel symmetric int8 weights (what int8 "
                              f"tensor-core matmuls and compressed-tensors' int-quantized format take): set "
                              f"weights.group_size: null and weights.symmetric: true")
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
            "calibration": init_fields(self.calibration),
            "check": init_fields(self.check),
            "partial_groups": self.partial_groups,
        }

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "recipe") -> Recipe:
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where}: the top level must be a mapping, got {type(data).__name__}")
        data = dict(data)
        scheme = data.get("scheme", "W4A16")
        if not isinstance(scheme, str) or scheme not in SCHEMES:
            raise RecipeError(f"{child_path(where, 'scheme')}: unknown scheme {scheme!r}; "
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
                                  f"got {steps!r}")
            data["algorithms"] = [AlgorithmStep.from_yaml_data(s, child_path(child_path(where, "algorithms"), i))
                                  for i, s in enumerate(steps)]
        if "overrides" in data:
            items = data["overrides"]
            if not isinstance(items, list):
                raise RecipeError(f"{child_path(where, 'overrides')}: expected a list of "
                                  f"{{pattern: ..., weights: {{...}}}}, got {items!r}")
            data["overrides"] = [_parse_override(o, child_path(child_path(where, "overrides"), i))
                                 for i, o in enumerate(items)]
        return parse_dataclass(cls, data, where)

    @classmethod
    def from_yaml(cls, text: str, where: str = "recipe", default_name: str | None = None) -> Recipe:
        data = _load_yaml(text, where)
        if default_name is not None and "name" not in data:
            data = {"name": default_name, **data}
        return cls.from_dict(data, where)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False,
                         default_flow_style=None, allow_unicode=True, width=100)


def _parse_override(data, where: str) -> LayerOverride:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: expected {{pattern: ..., weights: {{...}}}}, got {data!r}")
    for key in data:
        if key not in ("pattern", "weights"):
            raise RecipeError(f"unknown key {key!r} in {where}; valid keys: pattern, weights")
    for key in ("pattern", "weights"):
        if key not in data:
            raise RecipeError(f"{where}: missing key {key!r}")
    if not isinstance(data["weights"], Mapping):
        raise wrong_type(data["weights"], IntSpec, child_path(where, "weights"))
    try:
        return LayerOverride(data["pattern"], data["weights"])
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from e


# --------------------------------------------------------------------------- YAML in/out

class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads 1e-3 as a float (YAML 1.2 style)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    pass


def _load_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{where}: invalid YAML{at}: {e.problem or e.context}") from e
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: the top level must be a mapping of recipe keys, "
                          f"got {type(data).__name__}")
    return data


def _shipped_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a shipped recipe by file stem ("w4a16-rtn") or any recipe file by path."""
    text = str(name_or_path)
    is_path = (isinstance(name_or_path, Path) or "/" in text or "\\" in text
               or text.endswith((".yaml", ".yml")))
    path = Path(name_or_path) if is_path else RECIPES_DIR / f"{text}.yaml"
    if not path.is_file():
        what = f"recipe file {str(path)!r} does not exist" if is_path else f"no recipe named {text!r}"
        raise RecipeError(f"{what}; shipped recipes: {', '.join(_shipped_names()) or '(none)'}")
    return Recipe.from_yaml(path.read_text(encoding="utf-8"), where=str(path), default_name=path.stem)


def list_recipes() -> list[tuple[str, str]]:
    """(name, description) of every recipe under RECIPES_DIR, sorted by name."""
    return sorted((r.name, r.description) for r in map(load_recipe, sorted(RECIPES_DIR.glob("*.yaml"))))
