"""config.json["quantization_config"] in compressed-tensors' form.

Three formats, by scheme:
    pack-quantized   integer weights (2..8 bits) packed into int32, 16-bit activations
    int-quantized    W8A8-INT8 / W4A8-INT8: integer weights (2..8 bits, symmetric, per channel or in
                     groups) unpacked in int8, int8 activations (per token, or per tensor + input_scale)
    float-quantized  W8A8-FP8: FP8 E4M3 weights, FP8 activations (likewise)

Layers sharing one weight spec form one config group. When every quantized linear
shares a spec, the group targets the class name "Linear" and `ignore` lists the
linears left in float (the common, most portable form); otherwise each group
lists its layers by exact name.

Reading, every field is type-checked with its JSON path (`typed`), and
`LinearScheme.layout` says which tensors, of which dtypes and shapes, one
linear of each scheme stores.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from quantkit.errors import CheckpointError
from quantkit.formats import ActSpec, FloatSpec, IntSpec, packed_shape, per_tensor
from quantkit.formats.spec import SCALE_DTYPES

FORMAT = "pack-quantized"
FORMATS = {None: FORMAT, "int8": "int-quantized", "fp8": "float-quantized"}  # by activation type
FLOAT_DTYPES = ("F16", "BF16", "F32")  # safetensors' names of the float dtypes a scale may have


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

    def layout(self, name: str, out: int, inp: int, bias: bool) -> dict[str, Expected]:
        """The tensors linear `name` ([out, inp] weight) stores under this scheme."""
        spec, t = self.weights, {}
        g = spec.num_groups(inp)
        groups = ("one scale per output channel" if spec.group_size is None
                  else f"group size {spec.group_size} on {inp} inputs: {g} groups")
        if self.activations is None:  # pack-quantized
            t[f"{name}.weight_packed"] = Expected(("I32",), packed_shape((out, inp), spec.bits, 1),
                                                  f"{spec.bits}-bit values of a [{out}, {inp}] weight, packed along the inputs")
            t[f"{name}.weight_scale"] = Expected(FLOAT_DTYPES, (out, g), groups)
            t[f"{name}.weight_shape"] = Expected(("I64", "I32"), (2,), f"the values {out}, {inp}")
            if not spec.symmetric:
                t[f"{name}.weight_zero_point"] = Expected(("I32",), packed_shape((out, g), spec.bits, 0),
                                                          f"asymmetric: {spec.bits}-bit zero points packed along the outputs")
            t[f"{name}.weight_g_idx"] = Expected(("I32", "I64"), (inp,), "the group of each input (act-order)", optional=True)
        else:  # int-quantized / float-quantized
            fp8 = isinstance(spec, FloatSpec)
            values = "" if fp8 or spec.bits == 8 else f", {spec.bits}-bit values"
            t[f"{name}.weight"] = Expected(("F8_E4M3",) if fp8 else ("I8",), (out, inp), f"{self.format} weight{values}")
            t[f"{name}.weight_scale"] = Expected(FLOAT_DTYPES, (1,) if per_tensor(spec) else (out, g),
                                                 "one scale per tensor" if per_tensor(spec) else groups)
            if not self.activations.dynamic:
                t[f"{name}.input_scale"] = Expected(FLOAT_DTYPES, (1,), "static input activations: one input scale")
        if bias:
            t[f"{name}.bias"] = Expected(FLOAT_DTYPES, (out,), "the bias")
        return t


@dataclass(frozen=True)
class Expected:
    """One on-disk tensor: the safetensors dtypes it may have, its shape, and why."""

    dtypes: tuple[str, ...]
    shape: tuple[int, ...]
    why: str
    optional: bool = False


def weight_args(spec: IntSpec | FloatSpec, actorder: str | None = None) -> dict:
    """compressed-tensors QuantizationArgs for a weight spec."""
    if isinstance(spec, FloatSpec):
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": spec.strategy, "group_size": None,
                "dynamic": False, "actorder": None, "observer": "minmax"}
    args = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": "channel" if spec.group_size is None else "group",
        "group_size": spec.group_size,
        "dynamic": False,
        "actorder": actorder,
        "observer": "minmax",
    }
    if spec.scale_dtype is not None:  # written only when asked for: older readers do not know the key
        args["scale_dtype"] = f"torch.{spec.scale_dtype}"
    return args


def input_args(act: ActSpec) -> dict:
    """compressed-tensors QuantizationArgs for a linear's input activations."""
    return {"num_bits": 8, "type": "float" if act.type == "fp8" else "int", "symmetric": True,
            "strategy": "token" if act.dynamic else "tensor", "group_size": None, "dynamic": act.dynamic,
            "actorder": None, "observer": None if act.dynamic else act.observer}


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


# --------------------------------------------------------------------------- JSON types

_KINDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "object": (dict, "an object"),
    "array": (list, "a list"),
    "string": (str, "a string"),
    "integer": (int, "an integer"),
    "number": ((int, float), "a number"),
    "bool": (bool, "true or false"),
}


def show(value: object, limit: int = 60) -> str:
    """A JSON value as it reads in the file, cut to `limit` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(name: str) -> str:
    """A name from a file (a JSON key, a tensor name) as it may appear in a one-line message."""
    return name if name.isprintable() else show(name, 200)


def described(e: BaseException) -> str:
    """A third-party exception as one line: its type and the start of its message (without the
    C++ stack torch appends)."""
    text = str(e).split("Exception raised from", 1)[0]
    text = " ".join(text.split())
    return f"{type(e).__name__}: {text[:400]}{'...' if len(text) > 400 else ''}"


def typed(value: object, kind: str, path: str, nullable: bool = False):
    """`value` when it has the JSON `kind`, else CheckpointError naming its `path`
    (e.g. `quantization_config.config_groups.group_0.weights.num_bits: expected an integer, got "4"`)."""
    if value is None and nullable:
        return None
    types, desc = _KINDS[kind]
    ok = isinstance(value, types) and not (kind in ("integer", "number") and isinstance(value, bool))
    if ok and isinstance(value, float) and not math.isfinite(value):  # json reads NaN and Infinity
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: expected {desc}{' or null' if nullable else ''}, got {show(value)}")
    return value


def field(obj: dict, key: str, kind: str, path: str, default=None, required: bool = False):
    """obj[key] checked by `typed`; missing or null gives `default` unless `required`."""
    at = f"{path}.{key}" if path else key
    if key not in obj or obj[key] is None:
        if required:
            raise CheckpointError(f"{at}: missing (expected {_KINDS[kind][1]})")
        return default
    return typed(obj[key], kind, at)


def string_list(value: object, path: str) -> list[str]:
    """A list of strings (null: empty)."""
    items = typed(value, "array", path, nullable=True) or []
    return [typed(v, "string", f"{path}[{i}]") for i, v in enumerate(items)]


# --------------------------------------------------------------------------- compressed-tensors args

def act_from_args(args: dict, path: str) -> ActSpec:
    kind = field(args, "type", "string", path, "int")
    strategy = field(args, "strategy", "string", path)
    bits = field(args, "num_bits", "integer", path)
    symmetric = field(args, "symmetric", "bool", path, True)
    dynamic = args.get("dynamic", False)  # compressed-tensors also knows "local" (NVFP4), refused below
    if bits != 8 or kind not in ("int", "float") or not symmetric:
        raise CheckpointError(f"{path}: input activations {show(args, 200)} are not supported (8-bit symmetric int or float)")
    if (dynamic, strategy) not in ((True, "token"), (False, "tensor")) or not isinstance(dynamic, bool):
        raise CheckpointError(f"{path}: input activations with strategy {strategy!r} and dynamic {show(dynamic)} are "
                              f"not supported (dynamic per token, or static per tensor)")
    observer = "mse" if not dynamic and kind == "int" and args.get("observer") == "mse" else "minmax"
    return ActSpec("fp8" if kind == "float" else "int8", dynamic, observer)


def spec_from_args(args: dict, path: str) -> IntSpec | FloatSpec:
    kind = field(args, "type", "string", path, "int")
    bits = field(args, "num_bits", "integer", path, required=True)
    strategy = field(args, "strategy", "string", path)
    group_size = field(args, "group_size", "integer", path)
    symmetric = field(args, "symmetric", "bool", path, True)
    if kind == "float":
        if bits != 8 or strategy not in ("channel", "tensor"):
            raise CheckpointError(f"{path}: float weights {show(args, 200)} are not supported (8 bits, per channel or tensor)")
        return FloatSpec(strategy)
    if kind != "int":
        raise CheckpointError(f"{path}.type: weight type {kind!r} is not supported (int or float)")
    strategy = strategy or ("group" if group_size else "channel")
    if strategy not in ("group", "channel"):
        raise CheckpointError(f"{path}.strategy: integer weight strategy {strategy!r} is not supported (group, channel)")
    if not 2 <= bits <= 8:
        raise CheckpointError(f"{path}.num_bits: {bits}-bit integer weights are not supported (2..8)")
    if strategy == "group" and (group_size is None or group_size <= 0):
        raise CheckpointError(f"{path}.group_size: strategy 'group' needs a positive group size, got {show(group_size)}")
    scale_dtype = field(args, "scale_dtype", "string", path)
    if scale_dtype is not None:
        scale_dtype = scale_dtype.removeprefix("torch.")
        if scale_dtype not in SCALE_DTYPES:
            raise CheckpointError(f"{path}.scale_dtype: scales stored as {show(args['scale_dtype'])} are not supported "
                                  f"({', '.join(SCALE_DTYPES)})")
    return IntSpec(bits=bits, symmetric=symmetric, group_size=group_size if strategy == "group" else None,
                   scale_dtype=scale_dtype)


def _scheme(group: dict, top: str | None, path: str) -> LinearScheme:
    supported = ", ".join(FORMATS.values())
    fmt = field(group, "format", "string", path) or top
    if fmt not in FORMATS.values():
        raise CheckpointError(f"{path}: format {fmt!r} is not supported (supported: {supported})")
    if group.get("output_activations") is not None:
        raise CheckpointError(f"{path} quantizes output activations, which quantkit does not support")
    weights = field(group, "weights", "object", path, required=True)
    spec = spec_from_args(weights, f"{path}.weights")
    acts = field(group, "input_activations", "object", path)
    act = act_from_args(acts, f"{path}.input_activations") if acts else None
    scheme = LinearScheme(spec, act)
    if act is not None and act.type == "int8" and isinstance(spec, IntSpec) and not spec.symmetric:
        raise CheckpointError(f"{path}: asymmetric integer weights with int8 input activations (a zero point "
                              f"per group) are not supported; quantkit reads symmetric ones")
    # int-quantized: symmetric integer weights of any width, per channel or in groups (W8A8, W4A8)
    w8a8_ok = act is None or (isinstance(spec, FloatSpec) if act.type == "fp8" else isinstance(spec, IntSpec))
    if scheme.format != fmt or not w8a8_ok:
        raise CheckpointError(f"{path}: {fmt} with weights {show(weights, 200)} and input activations {show(acts, 200)} "
                              f"is not a combination quantkit reads")
    return scheme


def _target(pattern: str, path: str) -> re.Pattern | str:
    if not pattern.startswith("re:"):
        return pattern
    try:
        return re.compile(pattern[3:])
    except re.error as e:
        raise CheckpointError(f"{path}: {pattern!r} is not a valid regular expression: {e}") from None


def spec_resolver(qconfig: object, where: str):
    """A function (linear name, class names) -> LinearScheme | None from a compressed-tensors
    quantization_config; every field it reads is type-checked first (CheckpointError naming
    `where` and the field's path)."""
    path = "quantization_config"
    try:
        qc = typed(qconfig, "object", path)
        method = field(qc, "quant_method", "string", path, required=True)
        if method != "compressed-tensors":
            raise CheckpointError(f"{path}.quant_method: {method!r} is not supported (compressed-tensors)")
        supported = ", ".join(FORMATS.values())
        top = field(qc, "format", "string", path)
        if top not in (*FORMATS.values(), "mixed-precision"):  # mixed-precision: each group names its own
            raise CheckpointError(f"{path}: format {top!r} is not supported (supported: {supported})")
        status = field(qc, "quantization_status", "string", path, "compressed")
        if status != "compressed":
            raise CheckpointError(f"{path}.quantization_status: {status!r}: the weights are not stored compressed, "
                                  f"which quantkit does not read")
        if qc.get("kv_cache_scheme") is not None:
            raise CheckpointError(f"{path}.kv_cache_scheme: the checkpoint quantizes the KV cache, which quantkit does not read")
        online_transforms(qc, where)  # checked here; applied by the reader
        sparsity = field(qc, "sparsity_config", "object", path) or {}
        if sparsity.get("format") not in (None, "dense"):
            raise CheckpointError(f"{path}.sparsity_config: a sparse checkpoint (format {show(sparsity.get('format'))}), "
                                  f"which quantkit does not read")
        groups = []
        for gname, group in (field(qc, "config_groups", "object", path) or {}).items():
            at = f"{path}.config_groups.{printable(gname)}"
            group = typed(group, "object", at)
            typed(group.get("targets"), "array", f"{at}.targets")
            targets = [_target(t, f"{at}.targets[{i}]") for i, t in enumerate(string_list(group["targets"], f"{at}.targets"))]
            groups.append((targets, _scheme(group, top, at)))
        ignore = [_target(t, f"{path}.ignore[{i}]") for i, t in enumerate(string_list(qc.get("ignore"), f"{path}.ignore"))]
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None

    def resolve(name: str, class_names: Iterable[str]) -> LinearScheme | None:
        classes = set(class_names)

        def hit(target: re.Pattern | str) -> bool:
            if isinstance(target, re.Pattern):
                return target.match(name) is not None
            return target == name or target in classes

        if any(hit(t) for t in ignore):
            return None
        for targets, scheme in groups:
            if any(hit(t) for t in targets):
                return scheme
        return None

    return resolve


def online_transforms(qconfig: dict, where: str) -> list[tuple[list, int]]:
    """The online input rotations a quantization_config's transform_config asks for, as (targets,
    Hadamard block) pairs: the form quantkit writes (quantkit.algorithms.rotation.transform_config),
    "hadamard" schemes at linears' inputs, not randomized, head_dim a power of two. Anything else
    (other transform types, weight or output locations, inverses) is refused by name."""
    path = "quantization_config.transform_config"
    tc = qconfig.get("transform_config")
    if tc is None:
        return []
    out = []
    try:
        tc = typed(tc, "object", path)
        for gname, scheme in (field(tc, "config_groups", "object", path) or {}).items():
            at = f"{path}.config_groups.{printable(gname)}"
            scheme = typed(scheme, "object", at)
            kind = field(scheme, "type", "string", at, required=True)
            block = field(scheme, "head_dim", "integer", at)
            if kind != "hadamard" or field(scheme, "randomize", "bool", at, False) or block is None \
                    or block < 1 or block & (block - 1):
                raise CheckpointError(f"{at}: a {show(kind)} transform (randomize {show(scheme.get('randomize'))}, "
                                      f"head_dim {show(block)}); quantkit reads only not-randomized \"hadamard\" "
                                      f"transforms with a power-of-two head_dim")
            for i, args in enumerate(typed(scheme.get("apply"), "array", f"{at}.apply")):
                a = typed(args, "object", f"{at}.apply[{i}]")
                location, inverse = field(a, "location", "string", f"{at}.apply[{i}]"), field(a, "inverse", "bool", f"{at}.apply[{i}]", False)
                if location != "input" or inverse or string_list(a.get("ignore"), f"{at}.apply[{i}].ignore"):
                    raise CheckpointError(f"{at}.apply[{i}]: location {show(location)}, inverse {show(inverse)}: quantkit "
                                          f"reads only rotations of a linear's input (location \"input\", no inverse, no ignore)")
                targets = [_target(t, f"{at}.apply[{i}].targets[{j}]")
                           for j, t in enumerate(string_list(a.get("targets"), f"{at}.apply[{i}].targets"))]
                out.append((targets, block))
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return out
