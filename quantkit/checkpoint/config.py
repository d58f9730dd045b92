"""config.json["quantization_config"] in compressed-tensors' form.

Three formats, by scheme:
    pack-quantized   integer weights (2..8 bits) packed into int32, 16-bit activations
    int-quantized    W8A8-INT8: int8 weights, int8 activations (per token, or per tensor + input_scale)
    float-quantized  W8A8-FP8: FP8 E4M3 weights, FP8 activations (likewise)

Layers sharing one weight spec form one config group. When every quantized linear
shares a spec, the group targets the class name "Linear" and `ignore` lists the
linears left in float (the common, most portable form); otherwise each group
lists its layers by exact name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from quantkit.errors import CheckpointError
from quantkit.formats import ActSpec, FloatSpec, IntSpec

FORMAT = "pack-quantized"
FORMATS = {None: FORMAT, "int8": "int-quantized", "fp8": "float-quantized"}  # by activation type


def format_for(act: ActSpec | None) -> str:
    return FORMATS[None if act is None else act.type]


@dataclass(frozen=True)
class LinearScheme:
    """How one linear is stored: its weight spec and, W8A8, its input quantization."""

    weights: IntSpec | FloatSpec
    activations: ActSpec | None = None

    @property
    def format(self) -> str:
        return format_for(self.activations)


def weight_args(spec: IntSpec | FloatSpec, actorder: str | None = None) -> dict:
    """compressed-tensors QuantizationArgs for a weight spec."""
    if isinstance(spec, FloatSpec):
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": spec.strategy, "group_size": None,
                "dynamic": False, "actorder": None, "observer": "minmax"}
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": "channel" if spec.group_size is None else "group",
        "group_size": spec.group_size,
        "dynamic": False,
        "actorder": actorder,
        "observer": "minmax",
    }


def input_args(act: ActSpec) -> dict:
    """compressed-tensors QuantizationArgs for a linear's input activations."""
    return {"num_bits": 8, "type": "float" if act.type == "fp8" else "int", "symmetric": True,
            "strategy": "token" if act.dynamic else "tensor", "group_size": None, "dynamic": act.dynamic,
            "actorder": None, "observer": None if act.dynamic else "minmax"}


def act_from_args(args: dict, where: str) -> ActSpec:
    kind, strategy, dynamic = args.get("type", "int"), args.get("strategy"), bool(args.get("dynamic", False))
    if args.get("num_bits") != 8 or kind not in ("int", "float") or not args.get("symmetric", True):
        raise CheckpointError(f"{where}: input activations {args} are not supported (8-bit symmetric int or float)")
    if (dynamic, strategy) not in ((True, "token"), (False, "tensor")):
        raise CheckpointError(f"{where}: input activations with strategy {strategy!r} and dynamic {dynamic} are "
                              f"not supported (dynamic per token, or static per tensor)")
    return ActSpec("fp8" if kind == "float" else "int8", dynamic)


def spec_from_args(args: dict, where: str) -> IntSpec | FloatSpec:
    if args.get("type", "int") == "float":
        if args.get("num_bits") != 8 or args.get("strategy") not in ("channel", "tensor"):
            raise CheckpointError(f"{where}: float weights {args} are not supported (8 bits, per channel or tensor)")
        return FloatSpec(args["strategy"])
    if args.get("type", "int") != "int":
        raise CheckpointError(f"{where}: weight type {args.get('type')!r} is not supported (int or float)")
    strategy = args.get("strategy", "group" if args.get("group_size") else "channel")
    if strategy not in ("group", "channel"):
        raise CheckpointError(f"{where}: weight strategy {strategy!r} is not supported (group, channel)")
    try:
        return IntSpec(
            bits=int(args["num_bits"]),
            symmetric=bool(args.get("symmetric", True)),
            group_size=int(args["group_size"]) if strategy == "group" else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad weight quantization args {args}: {e}") from e


def build_quantization_config(specs: dict[str, IntSpec | FloatSpec], float_linears: Iterable[str],
                              actorder: str | None = None, activations: ActSpec | None = None) -> dict:
    """specs: quantized linear name -> spec; float_linears: Linear modules kept in float;
    activations: how every quantized linear's input is quantized (None: 16 bits)."""
    by_spec: dict[IntSpec | FloatSpec, list[str]] = {}
    for name, spec in specs.items():
        by_spec.setdefault(spec, []).append(name)
    fmt = format_for(activations)
    inputs = None if activations is None else input_args(activations)

    def group(spec, targets: list[str]) -> dict:
        return {"targets": targets, "weights": weight_args(spec, actorder), "input_activations": inputs,
                "output_activations": None, "format": fmt}

    if len(by_spec) == 1:
        (spec,) = by_spec
        groups = {"group_0": group(spec, ["Linear"])}
    else:
        groups = {f"group_{i}": group(spec, sorted(names)) for i, (spec, names) in enumerate(by_spec.items())}
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(float_linears) if len(by_spec) == 1 else [],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def spec_resolver(qconfig: dict, where: str):
    """A function (linear name, class names) -> LinearScheme | None from a quantization_config."""
    if qconfig.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{where}: quant_method {qconfig.get('quant_method')!r} is not supported (compressed-tensors)")
    supported = ", ".join(FORMATS.values())
    top = qconfig.get("format")
    if top not in (*FORMATS.values(), "mixed-precision"):  # mixed-precision: each group names its own
        raise CheckpointError(f"{where}: format {top!r} is not supported (supported: {supported})")
    groups = []
    for gname, group in (qconfig.get("config_groups") or {}).items():
        at = f"{where}: {gname}"
        fmt = group.get("format") or top
        if fmt not in FORMATS.values():
            raise CheckpointError(f"{at}: format {fmt!r} is not supported (supported: {supported})")
        if group.get("output_activations"):
            raise CheckpointError(f"{at} quantizes output activations, which quantkit does not support")
        weights = spec_from_args(group.get("weights") or {}, at)
        acts = group.get("input_activations")
        act = act_from_args(acts, at) if acts else None
        scheme = LinearScheme(weights, act)
        if scheme.format != fmt or (act is not None and (act.type == "fp8") != isinstance(weights, FloatSpec)):
            raise CheckpointError(f"{at}: {fmt} with weights {group.get('weights')} and input activations {acts} "
                                  f"is not a combination quantkit reads")
        groups.append((tuple(group.get("targets", [])), scheme))
    ignore = tuple(qconfig.get("ignore") or ())

    def resolve(name: str, class_names: Iterable[str]) -> LinearScheme | None:
        classes = set(class_names)

        def hit(target: str) -> bool:
            return _matches(name, target) or target in classes

        if any(hit(t) for t in ignore):
            return None
        for targets, spec in groups:
            if any(hit(t) for t in targets):
                return spec
        return None

    return resolve
