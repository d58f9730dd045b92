"""Property: any mutation of a shipped recipe is accepted or refused with a quantkit error (issue 18).

Two strategies: the shipped recipes' text mutated (characters flipped,
inserted and deleted, YAML fragments inserted, values replaced, truncations,
line swaps, indentation changes, deep nesting, long strings), read through
Recipe.from_yaml and load_recipe; and valid recipe dicts with one field
replaced by a random value, through Recipe.from_dict. Either way an accepted
recipe goes through build_all and spec_for and must survive to_yaml ->
from_yaml unchanged. Anything that escapes other than a QuantkitError fails,
and so does an example still running after a few seconds (an alarm).
Derandomized, so CI runs the same examples every time; scripts/fuzz.py runs
thousands more.
"""

from __future__ import annotations

import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantkit.algorithms import build_all
from quantkit.errors import QuantkitError
from quantkit.recipe import RECIPES_DIR, Recipe, load_recipe

SHIPPED = {p.stem: p.read_text(encoding="utf-8") for p in sorted(RECIPES_DIR.glob("*.yaml"))}
LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj", "lm_head"]
HANG_SECONDS = 10  # per example; a real example takes milliseconds

FRAGMENTS = [
    "&a ", "*a", "&a [1, 2]", "[*a, *a]", "!!python/object:os.system", "!!python/name:os.system ",
    "[", "]", "{", "}", ":", ": ", "- ", "{{", "}}", "? ", "!!set {a, b}", "!!binary aGVsbG8=", "2001-12-14",
    "2001-13-45", "!!timestamp 2001-12-14", ".nan", ".inf", "-.inf", "1e400", "9" * 5000, "10" * 200, "0x1F",
    "1:20", "a{99999999999}", "(", "(" * 2000 + ")" * 2000, "\\", "null", "true", "yes", "'", '"', "#",
    "---\n", "<<: {a: 1}", "!!int abc", "!!bool abc", "!!omap [a: 1]", "? [a, b]\n: 1\n", "\t", "\n", "\n  ",
    "\x00", "\ufeff", "\ud800", "é", "[" * 40 + "]" * 40, "x" * 20_000,
]
CHARS = st.characters(codec=None, exclude_categories=())  # any code point, lone surrogates included
HUGE = 10**400


# --------------------------------------------------------------------------- text mutations

def _position(draw, text: str) -> int:
    return draw(st.integers(0, len(text)))


def _insert(draw, text: str) -> str:
    i = _position(draw, text)
    piece = draw(st.one_of(st.sampled_from(FRAGMENTS), st.text(CHARS, min_size=1, max_size=8)))
    return text[:i] + piece + text[i:]


def _flip(draw, text: str) -> str:
    i = _position(draw, text)
    return text[:i] + draw(CHARS) + text[i + 1:]


def _replace_value(draw, text: str) -> str:
    starts = [i + 2 for i in range(len(text) - 1) if text[i:i + 2] == ": "]
    if not starts:
        return _insert(draw, text)
    i = draw(st.sampled_from(starts))
    j = i
    while j < len(text) and text[j] not in ",}]\n":
        j += 1
    return text[:i] + draw(st.sampled_from(FRAGMENTS + ["[]", "{}", "{a: 1}", "0", "-1", "1.5", str(2**64)])) + text[j:]


def _delete(draw, text: str) -> str:
    i = _position(draw, text)
    return text[:i] + text[i + draw(st.integers(1, 40)):]


def _truncate(draw, text: str) -> str:
    return text[:_position(draw, text)]


def _swap_lines(draw, text: str) -> str:
    lines = text.split("\n")
    i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
    lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def _reindent(draw, text: str) -> str:
    lines = text.split("\n")
    i = draw(st.integers(0, len(lines) - 1))
    lines[i] = " " * draw(st.sampled_from([1, 2, 4])) + lines[i] if draw(st.booleans()) else lines[i].lstrip()
    return "\n".join(lines)


MUTATIONS = [_insert, _flip, _replace_value, _replace_value, _delete, _truncate, _swap_lines, _reindent]


@st.composite
def mutated_recipes(draw) -> str:
    text = SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))]
    for _ in range(draw(st.integers(1, 4))):
        text = draw(st.sampled_from(MUTATIONS))(draw, text)
    return text


# --------------------------------------------------------------------------- structured: one field replaced

# odd values for what a field held; drawn half the time, random plain data the other half
ODD_NUMBERS = [0, -1, 2**31, 2**63, 2**64, HUGE, -HUGE, float("nan"), float("inf"), -float("inf"), 1e308, 0.5, True]
ODD_STRINGS = ["", "x" * 10_000, "a{99999999999}", "(" * 2000, "[", "\x00", "rtn", "search", "W8A8-FP8", "2001-12-14"]
ODD_OTHERS = [None, [], {}, [[[[]]]], {"a": {"b": 1}}, [HUGE], ["a{99999999999}"]]
random_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def odd_values_for(value) -> st.SearchStrategy:
    like = ODD_STRINGS if isinstance(value, str) else ODD_NUMBERS if isinstance(value, (int, float)) else ODD_OTHERS
    return st.sampled_from(like + ODD_OTHERS) | random_values


def _paths(data, prefix=()) -> list[tuple]:
    """Every place in plain data: mapping keys and list indices, at every depth."""
    found = [prefix] if prefix else []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found += _paths(value, prefix + (key,))
    return found


@st.composite
def recipe_dicts_with_one_field_replaced(draw) -> dict:
    data = load_recipe(draw(st.sampled_from(sorted(SHIPPED)))).to_dict()
    path = draw(st.sampled_from(_paths(data) + [("new_key",), ("calibration", "new_key")]))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = draw(odd_values_for(parent.get(path[-1]) if isinstance(parent, dict) else parent[path[-1]]))
    return data


# --------------------------------------------------------------------------- the properties

class Hung(BaseException):
    """A BaseException, so no `except Exception` in the code under test swallows it."""


@contextmanager
def hang_guard(seconds: float = HANG_SECONDS):
    def on_alarm(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_accepted(recipe: Recipe) -> None:
    """What quantkit does with a recipe before any model work, and the copy it writes."""
    try:
        build_all(recipe)
        for layer in LAYERS:
            recipe.spec_for(layer, 576)
    except QuantkitError:
        return
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


FUZZ = settings(max_examples=200, derandomize=True, database=None, deadline=2000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="quantkit-fuzz-") as tmp:
        yield Path(tmp)


@FUZZ
@given(text=mutated_recipes())
def test_mutated_recipe_text_is_accepted_or_refused(folder, text):
    path = folder / "mutant.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # a lone surrogate: invalid UTF-8 on disk
    with hang_guard():
        for read in (lambda: Recipe.from_yaml(text, default_name="mutant"), lambda: load_recipe(path)):
            try:
                recipe = read()
            except QuantkitError:
                continue
            check_accepted(recipe)


@FUZZ
@given(data=recipe_dicts_with_one_field_replaced())
def test_recipe_dict_with_a_field_replaced_is_accepted_or_refused(data):
    with hang_guard():
        try:
            recipe = Recipe.from_dict(data)
        except QuantkitError:
            return
        check_accepted(recipe)


def test_the_strategies_reach_both_outcomes():
    """The properties are not vacuous: some mutants are accepted, some refused."""
    outcomes = set()

    @settings(max_examples=60, derandomize=True, database=None, deadline=None)
    @given(text=mutated_recipes())
    def sample(text):
        try:
            build_all(Recipe.from_yaml(text, default_name="m"))
            outcomes.add("accepted")
        except QuantkitError:
            outcomes.add("refused")

    sample()
    assert outcomes == {"accepted", "refused"}
