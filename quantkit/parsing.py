"""Strict parsing of plain YAML data into frozen dataclasses.

Used for recipes and for every algorithm's options: unknown keys, wrong types
and bad values raise RecipeError naming where (file, key) and what is valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping

class RecipeError(ValueError):
    """A problem in a recipe that the user caused (and can fix)."""


def child_path(where: str, key: str | int) -> str:
    # "w.yaml" -> "w.yaml: weights" -> "w.yaml: weights.bits" / "w.yaml: overrides[0]"
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if ": " in where else f"{where}: {key}"


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return f"mapping with keys {', '.join(_field_names(tp))}"
    return {bool: "bool (true or false)", float: "number"}.get(tp, getattr(tp, "__name__", str(tp)))


def init_fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def _field_names(cls) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(cls) if f.init)


def wrong_type(value, tp, where: str) -> RecipeError:
    return RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def convert_value(value, tp, where: str):
    """Check `value` (plain YAML data) against annotation `tp`; return the typed value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for alt in (a for a in args if a is not type(None)):
            try:
                return convert_value(value, alt, where)
            except RecipeError:
                continue
        raise wrong_type(value, tp, where)
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise RecipeError(f"{where}: invalid value {value!r}; valid values: "
                          + ", ".join(repr(a) for a in args))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong_type(value, tp, where)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert_value(v, args[0], child_path(where, i)) for i, v in enumerate(value))
        if len(value) != len(args):
            raise wrong_type(value, tp, where)
        return tuple(convert_value(v, a, child_path(where, i)) for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return parse_dataclass(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"parse_dataclass cannot handle the annotation {tp!r} ({where})")
    raise wrong_type(value, tp, where)


def parse_dataclass(cls, data: Mapping, where: str):
    """Build the frozen dataclass `cls` from plain YAML data, strictly.

    Unknown or missing keys, wrong types (bool is not an int; an int is a
    float), and ValueErrors from ``cls.__post_init__`` all raise RecipeError
    prefixed with `where` (e.g. ``"recipes/w4.yaml: weights"``).
    """
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: expected a mapping with keys {', '.join(_field_names(cls))}, "
                          f"got {data!r} ({type(data).__name__})")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise RecipeError(f"unknown key {key!r} in {where}; valid keys: "
                              + ", ".join(sorted(fields)))
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{where}: missing key {missing[0]!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: convert_value(value, hints[key], child_path(where, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ checks, RecipeError included
        raise RecipeError(f"{where}: {e}") from e
