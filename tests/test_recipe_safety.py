"""Nothing a user types into a recipe costs them more than one clear RecipeError (issue 18).

Alias bombs, deep nesting, huge files, regexes that break re.compile, YAML's
sets / dates / binary / complex keys, out-of-range numbers and very long values:
each is refused quickly, as a RecipeError (a QuantkitError), with a short
message naming the file, the line or the key.
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest

from quantkit import parsing, recipe as recipe_module
from quantkit.algorithms import build_all
from quantkit.errors import QuantkitError
from quantkit.formats.spec import IntSpec
from quantkit.parsing import MAX_DEPTH, load_yaml_mapping, shown
from quantkit.recipe import MAX_RECIPE_BYTES, Recipe, RecipeError, load_recipe
from test_bad_inputs import assert_clean_error, assert_nothing_written, cli

BILLION_LAUGHS = "\n".join([
    'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
    *(f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [" + ", ".join([f"*{chr(ord('a') + i - 1)}"] * 9) + "]"
      for i in range(1, 9)),
]) + "\n"


def write(tmp_path, text: str | bytes, name: str = "mine.yaml"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def refusal(tmp_path, text: str | bytes, name: str = "mine.yaml") -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text, name))
    return str(info.value)


def refusal_from_build(text: str) -> str:
    """The RecipeError from parsing `text` or, if it parses, from building its algorithms."""
    with pytest.raises(RecipeError) as info:
        build_all(Recipe.from_yaml(text, default_name="t"))
    return str(info.value)


# --------------------------------------------------------------------------- the error class

def test_recipe_error_is_a_quantkit_error_and_a_value_error():
    assert issubclass(RecipeError, QuantkitError) and issubclass(RecipeError, ValueError)
    assert parsing.RecipeError is recipe_module.RecipeError is RecipeError


# --------------------------------------------------------------------------- anchors, aliases, nesting

def test_alias_bomb_is_refused_quickly_naming_file_and_line(tmp_path):
    path = write(tmp_path, BILLION_LAUGHS, "bomb.yaml")
    start = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"took {elapsed:.2f} s"  # expanding it would take minutes and gigabytes
    msg = str(info.value)
    assert "bomb.yaml" in msg and "line 1" in msg and "anchors (&a)" in msg, msg


@pytest.mark.parametrize("text, words", [
    ("name: x\ndescription: *undefined\n", ["line 2", "aliases (*undefined)"]),
    ("name: &n x\n", ["line 1", "anchors (&n)"]),
    ("weights: &w {bits: 4}\n", ["line 1", "anchors (&w)"]),
    ("name: x\n<<: {description: y}\n", ["line 2", "merge keys (<<)"]),
])
def test_anchors_aliases_and_merge_keys_refused(tmp_path, text, words):
    msg = refusal(tmp_path, text)
    assert "mine.yaml" in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("text", [
    "name: x\ndescription: " + "[" * 10_000 + "]" * 10_000 + "\n",
    "name: x\ndescription: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n",
    "name: x\ndescription:\n" + "".join("  " * i + "- \n" for i in range(1, 60)),
], ids=["flow-lists", "flow-maps", "block-lists"])
def test_deep_nesting_refused_without_recursion_error(tmp_path, text):
    msg = refusal(tmp_path, text)
    assert f"nested deeper than {MAX_DEPTH} levels" in msg and "line" in msg, msg


def test_nesting_up_to_the_bound_reads():
    text = "a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"  # the top mapping is level 1
    value = load_yaml_mapping(text, "t")["a"]
    for _ in range(MAX_DEPTH - 2):
        (value,) = value
    assert value == []
    with pytest.raises(RecipeError, match="nested deeper"):
        load_yaml_mapping("a: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n", "t")


# --------------------------------------------------------------------------- YAML types a recipe does not take

@pytest.mark.parametrize("text, words", [
    ("name: !!set {a, b}\n", ["line 1", "!!set"]),
    ("name: !!binary aGVsbG8=\n", ["line 1", "!!binary"]),
    ("name: !!timestamp 2001-12-14\n", ["line 1", "!!timestamp"]),
    ("name: !!omap [a: 1]\n", ["!!omap"]),
    ("name: x\ncalibration:\n  seed: !!pairs [a: 1]\n", ["line 3", "!!pairs"]),
    ("? [a, b]\n: 1\n", ["line 1", "a list or a mapping as a key"]),
    ("name: x\n? {a: 1}\n: 2\n", ["line 2", "a list or a mapping as a key"]),
    ("name: !!python/object:os.system x\n", ["line 1", "python/object"]),
    ("name: !!bool maybe\n", ["line 1", "!!bool"]),
    ("name: !!int abc\n", ["line 1", "!!int"]),
    ("calibration: {seed: " + "9" * 5000 + "}\n", ["line 1", "!!int", "5,000 characters"]),
])
def test_yaml_values_a_recipe_does_not_take(tmp_path, text, words):
    msg = refusal(tmp_path, text)
    assert "mine.yaml" in msg and all(w in msg for w in words), msg
    assert len(msg) < 400, msg


def test_dates_are_strings(tmp_path):
    assert load_recipe(write(tmp_path, "name: 2001-12-14\n")).name == "2001-12-14"
    msg = refusal(tmp_path, "calibration: {seed: 2001-12-14}\n")
    assert "calibration.seed" in msg and "expected int" in msg and "'2001-12-14'" in msg


@pytest.mark.parametrize("text, words", [
    ("calibration: {seed: .inf}\n", ["calibration.seed", "expected int", "inf"]),
    ("calibration: {num_samples: .nan}\n", ["calibration.num_samples", "expected int", "nan"]),
    ("calibration: {seqlen: " + "9" * 400 + "}\n", ["seqlen", "400 characters"]),
    ("calibration: {seed: " + "9" * 30 + "}\n", ["seed", "9" * 30]),
    ("calibration: {batch_size: true}\n", ["batch_size", "expected int"]),
    ("check: {max_ratio: .nan}\n", ["max_ratio", "nan"]),
    ("check: {windows: 99999999999}\n", ["windows", "99999999999"]),
    ("weights: {group_size: .inf}\n", ["group_size", "inf"]),
    ("weights: {group_size: " + "9" * 400 + "}\n", ["group_size", "at most", "400 characters"]),
    ("overrides: [{pattern: down, weights: {group_size: 99999999999}}]\n", ["overrides[0]", "group_size", "at most"]),
    ("algorithms: [{gptq: {dampening: 1e400}}]\n", ["dampening", "inf"]),
    ("algorithms: [{gptq: {dampening: " + "9" * 400 + "}}]\n", ["dampening", "too large"]),
    ("algorithms: [{gptq: {dampening: .nan}}]\n", ["dampening", "nan"]),
    ("algorithms: [{gptq: {block_size: -1}}]\n", ["block_size", "-1"]),
    ("algorithms: [{awq: {grid: 99999999999}}, rtn]\n", ["grid", "1..1000"]),
    ("algorithms: [{awq: {max_shrink: .nan}}, rtn]\n", ["max_shrink", "nan"]),
    ("scheme: W8A8-INT8\nweights: {group_size: null}\nalgorithms: [{smoothquant: {alpha: .nan}}, rtn]\n",
     ["alpha", "nan"]),
    ("scheme: W8A8-INT8\nweights: {group_size: null}\nalgorithms: [{smoothquant: {grid: 0}}, rtn]\n",
     ["grid", "1..1000"]),
    ("algorithms: [{gptq: {actorder: [1, [2, [3]]]}}]\n", ["actorder"]),
    ("algorithms: [{rtn: {x: 1}}]\n", ["unknown key 'x'"]),
])
def test_out_of_range_and_odd_values_refused(text, words):
    msg = refusal_from_build(text)
    assert all(w in msg for w in words), msg
    assert len(msg) < 400, msg


# --------------------------------------------------------------------------- file size, encoding, paths

def test_oversized_file_refused_before_reading_it_and_left_untouched(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.write(b"name: huge\n")
        f.truncate(50 * 2**20)  # a sparse 50 MiB file: cheap to make, slow to parse
    before = path.stat()
    msg = refusal_path(path)
    assert "huge.yaml" in msg and f"{50 * 2**20:,} bytes" in msg and f"{MAX_RECIPE_BYTES:,}-byte limit" in msg, msg
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def refusal_path(path) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return str(info.value)


def test_file_just_over_the_cap_refused_and_at_the_cap_read(tmp_path):
    body = b"name: big\ndescription: x\n"
    at_cap = write(tmp_path, body + b"#" * (MAX_RECIPE_BYTES - len(body)), "at.yaml")
    assert load_recipe(at_cap).name == "big"
    over = write(tmp_path, body + b"#" * (MAX_RECIPE_BYTES + 1 - len(body)), "over.yaml")
    assert f"{MAX_RECIPE_BYTES + 1:,} bytes" in refusal_path(over)


def test_over_long_text_refused():
    with pytest.raises(RecipeError, match="over the .*-byte limit"):
        Recipe.from_yaml("#" * (MAX_RECIPE_BYTES + 1))
    with pytest.raises(RecipeError, match="over the .*-byte limit"):  # the cap is on UTF-8 bytes
        Recipe.from_yaml("#" + "é" * (MAX_RECIPE_BYTES // 2 + 1))


def test_non_utf8_file_refused_with_its_line(tmp_path):
    msg = refusal(tmp_path, b"name: x\ndescription: caf\xe9\n")
    assert "mine.yaml" in msg and "not UTF-8" in msg and "line 2" in msg, msg


def test_folder_as_recipe_refused(tmp_path):
    folder = tmp_path / "recipe.yaml"
    folder.mkdir()
    msg = refusal_path(folder)
    assert str(folder) in msg and "folder" in msg


def test_unreadable_file_refused(tmp_path, monkeypatch):
    path = write(tmp_path, "name: x\n")

    def no_permission(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "open", no_permission)
    msg = refusal_path(path)
    assert "cannot read recipe file" in msg and str(path) in msg and "Permission denied" in msg


@pytest.mark.parametrize("name", ["x" * 5000 + ".yaml", "a\x00b.yaml"], ids=["too-long", "nul-byte"])
def test_impossible_paths_refused(name):
    msg = refusal_path(name)
    assert len(msg) < 600, msg


# --------------------------------------------------------------------------- regexes

@pytest.mark.parametrize("pattern", [
    "a{99999999999}",  # OverflowError from re's parser
    "(" * 5000 + ")" * 5000,  # RecursionError from re's parser
    "mlp\\.(down",  # re.error
])
@pytest.mark.parametrize("key", ["targets", "ignore", "overrides"])
def test_regexes_that_do_not_compile(key, pattern):
    data = {"name": "t"}
    if key == "overrides":
        data["overrides"] = [{"pattern": pattern, "weights": {"bits": 8}}]
    else:
        data[key] = [pattern]
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data)
    msg = str(info.value)
    assert "invalid regex" in msg and (key if key != "overrides" else "overrides[0]") in msg, msg
    assert shown(pattern) in msg and len(msg) < 400, msg


@pytest.mark.parametrize("error", [MemoryError(), ValueError("odd"), OverflowError("big"), RecursionError()])
def test_any_compile_failure_is_a_recipe_error(monkeypatch, error):
    def failing_compile(pattern, flags=0):
        raise error

    # recipe.py's own `re` only: pytest's match= below compiles a regex too
    monkeypatch.setattr(recipe_module, "re", SimpleNamespace(compile=failing_compile, search=re.search))
    with pytest.raises(RecipeError, match=r"targets\[0\]: invalid regex 'x'"):
        Recipe.from_dict({"name": "t", "targets": ["x"]})


def test_spec_for_with_odd_but_valid_patterns():
    recipe = Recipe.from_dict({"name": "t", "targets": ["(a|b)*c", "\\d{0,65535}", ""],
                               "ignore": ["[[:alpha:]]"], "overrides": [{"pattern": "^$", "weights": {"bits": 8}}]})
    assert recipe.spec_for("model.layers.0.mlp.down_proj", 576) is not None
    assert recipe.spec_for("", None) == IntSpec(bits=8, symmetric=True, group_size=128)  # "" and "^$" match


# --------------------------------------------------------------------------- long values in messages

def test_long_value_gives_a_short_message(tmp_path):
    long = "x" * 10_000
    # keys longer than 1024 characters must be explicit (`? key`) in YAML
    for text in (f"scheme: {long}\n", f"? {long}\n: 1\n", f"weights:\n  ? {long}\n  : 1\n", f"targets: {long}\n",
                 f"algorithms:\n  - ? {long}\n    : {{}}\n", f"algorithms:\n  - gptq:\n      ? {long}\n      : 1\n",
                 f"algorithms: [{{gptq: {{actorder: {long}}}}}]\n", f"overrides: [{long}]\n",
                 f"name: x\ndescription: !!python/object:{long} x\n"):
        with pytest.raises(RecipeError) as info:
            build_all(Recipe.from_yaml(text, where=str(tmp_path / "r.yaml"), default_name="t"))
        msg = str(info.value)
        assert len(msg) < 500 and "..." in msg, msg[:1000]


def test_shown():
    assert shown("abc") == "'abc'"
    long = shown("y" * 10_000)
    assert long.startswith("'yyy") and "10,000 characters" in long and len(long) < 120
    assert "about 5,001 digits" in shown(10**5000)  # repr() itself refuses past 4300 digits
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    assert "nested too deep" in shown(nested)


# --------------------------------------------------------------------------- writing recipes back

@pytest.mark.parametrize("text", ["1e-3", "1e5", ".nan", "2001-12-14", "yes", "null", "0x1F", "*a", "&a", "!!set"])
def test_strings_round_trip_through_to_yaml(text):
    recipe = Recipe.from_dict({"name": text, "description": text, "calibration": {"data": text}})
    written = recipe.to_yaml()
    assert Recipe.from_yaml(written) == recipe
    assert "&id" not in written and "*id" not in written  # no anchors: the loader refuses them


# --------------------------------------------------------------------------- through the CLI

def test_alias_bomb_through_the_cli(tiny_model_dir, tmp_path):
    bomb = write(tmp_path, BILLION_LAUGHS, "bomb.yaml")
    out = tmp_path / "out"
    result, text = cli("quantize", tiny_model_dir, "--recipe", bomb, "--out", out)
    assert_clean_error(result, text, "bomb.yaml", "line 1", "anchors")
    assert_nothing_written(out)
