"""config.json["quantization_config"] in compressed-tensors' `pack-quantized` form.

Layers sharing one IntSpec form one config group. When every quantized linear
shares a spec, the group targets the class name "Linear" and `ignore` lists the
linears left in float (the common, most portable form); otherwise each group
lists its layers by exact name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from quantkit.errors import CheckpointError
from quantkit.formats import IntSpec

FORMAT = "pack-quantized"


def weight_args(spec: IntSpec, actorder: str | None = None) -> dict:
    """compressed-tensors QuantizationArgs for an IntSpec."""
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


def spec_from_args(args: dict, where: str) -> IntSpec:
    if args.get("type", "int") != "int":
        raise CheckpointError(f"{where}: weight type {args.get('type')!r} is not supported (int only)")
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


def build_quantization_config(specs: dict[str, IntSpec], float_linears: Iterable[str], actorder: str | None = None) -> dict:
    """specs: quantized linear name -> spec; float_linears: Linear modules kept in float."""
    by_spec: dict[IntSpec, list[str]] = {}
    for name, spec in specs.items():
        by_spec.setdefault(spec, []).append(name)
    groups = {}
    if len(by_spec) == 1:
        (spec,) = by_spec
        groups["group_0"] = {"targets": ["Linear"], "weights": weight_args(spec, actorder), "input_activations": None, "output_activations": None, "format": FORMAT}
    else:
        for i, (spec, names) in enumerate(by_spec.items()):
            groups[f"group_{i}"] = {"targets": sorted(names), "weights": weight_args(spec, actorder), "input_activations": None, "output_activations": None, "format": FORMAT}
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
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
    """A function (linear name, class names) -> IntSpec | None from a quantization_config."""
    if qconfig.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{where}: quant_method {qconfig.get('quant_method')!r} is not supported (compressed-tensors)")
    fmt = qconfig.get("format")
    if fmt != FORMAT:
        raise CheckpointError(f"{where}: format {fmt!r} is not supported yet (supported: {FORMAT})")
    groups = []
    for gname, group in (qconfig.get("config_groups") or {}).items():
        if group.get("input_activations") or group.get("output_activations"):
            raise CheckpointError(f"{where}: {gname} quantizes activations; only weight-only schemes are supported")
        if group.get("format", FORMAT) != FORMAT:
            raise CheckpointError(f"{where}: {gname} has format {group.get('format')!r}, expected {FORMAT}")
        groups.append((tuple(group.get("targets", [])), spec_from_args(group.get("weights") or {}, f"{where}: {gname}")))
    ignore = tuple(qconfig.get("ignore") or ())

    def resolve(name: str, class_names: Iterable[str]) -> IntSpec | None:
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
