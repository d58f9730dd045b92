"""Strict parsing of YAML text, and of plain YAML data into frozen dataclasses.

Used for recipes and for every algorithm's options: unknown keys, wrong types
and bad values raise RecipeError naming where (file, key) and what is valid.

:func:`load_yaml_mapping` reads plain data only: strings, numbers, booleans,
null, lists and mappings. Anchors and aliases are refused as they are met,
before anything expands (an alias bomb is a few lines that expand to
gigabytes), and so is nesting deeper than MAX_DEPTH; sets, binary, ordered
maps and merge keys are refused too. Like YAML 1.2, it reads ``1e-3`` as a
float and ``2024-01-01`` as a string (YAML 1.1 makes a date of it).

Every value or key quoted in a message goes through :func:`shown`, so a
10,000-character value makes a short message.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from quantkit.errors import RecipeError

__all__ = [
    "MAX_DEPTH", "RecipeError", "child_path", "convert_value", "cut", "dump_yaml", "init_fields", "load_yaml_mapping",
    "parse_dataclass", "shown", "wrong_type",
]

MAX_DEPTH = 32  # YAML nesting levels; recipes use four or five


# --------------------------------------------------------------------------- values in messages

def cut(text: str, limit: int = 200) -> str:
    """`text`, or its first `limit` characters, "..." and how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def shown(value, limit: int = 80) -> str:
    """repr(value) for an error message, cut to about `limit` characters."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"an integer of about {digits:,} digits"
    except RecursionError:
        return f"a {type(value).__name__} nested too deep to show"
    if len(text) <= limit:
        return text
    length = len(value) if isinstance(value, str) else len(text)  # a string's own length, not its repr's
    return f"{text[:limit]}... ({length:,} characters)"


def child_path(where: str, key: str | int) -> str:
    # "w.yaml" -> "w.yaml: weights" -> "w.yaml: weights.bits" / "w.yaml: overrides[0]"
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if ": " in where else f"{where}: {key}"


# --------------------------------------------------------------------------- YAML text

class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a recipe does not take (an alias, a set, deep nesting)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader for plain data (see the module docstring); rejects duplicate keys."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        # checked on the event, before the composer resolves an alias or the
        # constructor copies anything: a bomb is refused at its first anchor
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(None, None, f"aliases (*{cut(str(event.anchor), 40)}) are not allowed in a recipe; "
                                       f"write the value out", event.start_mark)
        if event.anchor is not None:
            raise _Refused(None, None, f"anchors (&{cut(str(event.anchor), 40)}) are not allowed in a recipe; "
                                       f"write the value out where it is used", event.start_mark)
        if self._depth >= MAX_DEPTH:
            raise _Refused(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except Exception as e:
            # PyYAML's constructors let other errors through: ValueError (an int of
            # 5000 digits, !!int abc), KeyError (!!bool abc); each is the text's fault
            raise ConstructorError(None, None, f"cannot read {shown(node.value)} as {_short_tag(node.tag)}: "
                                               f"{cut(str(e) or type(e).__name__, 120)}", node.start_mark) from e

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # YAML allows a list or a mapping as a key; Python dicts do not
                raise _Refused("while reading a mapping", node.start_mark,
                               "found a list or a mapping as a key; keys are names", key_node.start_mark) from None
            if duplicate:
                raise ConstructorError("while constructing a mapping", node.start_mark,
                                       f"found duplicate key {shown(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _short_tag(tag: str) -> str:
    return cut("!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else tag, 60)


def _refuse_tag(loader: _Loader, node) -> typing.NoReturn:
    if node.tag == "tag:yaml.org,2002:merge":
        raise _Refused(None, None, "merge keys (<<) are not allowed in a recipe; write the keys out", node.start_mark)
    raise _Refused(None, None, f"{_short_tag(node.tag)} values are not allowed in a recipe (strings, numbers, "
                               f"booleans, null, lists and mappings only)", node.start_mark)


for _tag in ("binary", "timestamp", "set", "omap", "pairs", "merge"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_tag)

# no implicit dates: 2024-01-01 stays a string (an explicit !!timestamp is refused above)
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# YAML 1.2 floats: 1e-3 (YAML 1.1 wants 1.0e-3)
_FLOAT_RESOLVER = ("tag:yaml.org,2002:float", re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
_Loader.add_implicit_resolver(*_FLOAT_RESOLVER)


def load_yaml_mapping(text: str, where: str) -> dict:
    """The mapping in YAML `text` (plain data only, see the module docstring);
    anything else raises RecipeError naming `where` and the line."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except _Refused as e:
        raise RecipeError(f"{where}{_at(e)}: {cut(e.problem)}") from None
    except yaml.MarkedYAMLError as e:
        raise RecipeError(f"{where}: invalid YAML{_at(e)}: {cut(str(e.problem or e.context))}") from e
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: invalid YAML: {cut(str(e))}") from e
    except Exception as e:  # whatever else the YAML library lets through
        raise RecipeError(f"{where}: invalid YAML: {type(e).__name__}: {cut(str(e))}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: the top level must be a mapping of recipe keys, "
                          f"got {type(data).__name__}")
    return data


class _Dumper(yaml.SafeDumper):
    """Writes what _Loader reads back as it was: no anchors or aliases (a list
    written twice is written out twice), and "1e-3" quoted when it is a string."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_implicit_resolver(*_FLOAT_RESOLVER)


def dump_yaml(data) -> str:
    """Plain YAML data as text that load_yaml_mapping reads back equal."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=None, allow_unicode=True, width=100)


def _at(error: yaml.MarkedYAMLError) -> str:
    mark = error.problem_mark or error.context_mark
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


# --------------------------------------------------------------------------- YAML data -> dataclasses

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
    return RecipeError(f"{where}: expected {_type_name(tp)}, got {shown(value)} ({type(value).__name__})")


def convert_value(value, tp, where: str):
    """Check `value` (plain YAML data) against annotation `tp`; return the typed value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        shapes = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, Mapping) and len(shapes) == 1:  # a mapping for the one dataclass: its own errors
            return convert_value(value, shapes[0], where)
        for alt in (a for a in args if a is not type(None)):
            try:
                return convert_value(value, alt, where)
            except RecipeError:
                continue
        raise wrong_type(value, tp, where)
    if origin is typing.Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise RecipeError(f"{where}: invalid value {shown(value)}; valid values: "
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
            return _as_float(value, where)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"parse_dataclass cannot handle the annotation {tp!r} ({where})")
    raise wrong_type(value, tp, where)


def _as_float(value: int | float, where: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an int past 1.8e308
        raise RecipeError(f"{where}: {shown(value)} is too large for a number") from None


def parse_dataclass(cls, data: Mapping, where: str):
    """Build the frozen dataclass `cls` from plain YAML data, strictly.

    Unknown or missing keys, wrong types (bool is not an int; an int is a
    float), and ValueErrors from ``cls.__post_init__`` all raise RecipeError
    prefixed with `where` (e.g. ``"recipes/w4.yaml: weights"``).
    """
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: expected a mapping with keys {', '.join(_field_names(cls))}, "
                          f"got {shown(data)} ({type(data).__name__})")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise RecipeError(f"unknown key {shown(key)} in {where}; valid keys: "
                              + ", ".join(sorted(fields)))
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{where}: missing key {missing[0]!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: convert_value(value, hints[key], child_path(where, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except RecipeError as e:  # already names what it is about
        raise RecipeError(f"{where}: {e}") from e
    # ValueError: the __post_init__ checks; TypeError, ArithmeticError: a check
    # that met a value it did not expect (a comparison, an overflow) -- the
    # value is still the user's, so it is still their error
    except (ValueError, TypeError, ArithmeticError) as e:
        raise RecipeError(f"{where}: {cut(str(e) or type(e).__name__)}") from e
