"""Recipes: shipped files load and round-trip; user mistakes give clear RecipeErrors."""

from dataclasses import dataclass

import pytest
import yaml

from quantkit.formats.spec import IntSpec
from quantkit.recipe import (
    ABLATIONS, RECIPES_DIR, SCHEMES, AlgorithmStep, CalibrationConfig, LayerOverride, Recipe, RecipeError,
    list_recipes, load_recipe, parse_dataclass,
)

SHIPPED = ["w3a16-gptq", "w3a16-gptq-actorder", "w3a16-rtn", "w4a16-awq", "w4a16-awq-gptq", "w4a16-gptq", "w4a16-gptq-actorder",
           "w4a16-gptq-rotate", "w4a16-rtn", "w4a16-rtn-asym", "w4a16-rtn-g64", "w4a8-int8", "w8a16-rtn",
           "w8a8-fp8-dynamic", "w8a8-fp8-static", "w8a8-int8-dynamic", "w8a8-int8-rotate", "w8a8-int8-rotate-online",
           "w8a8-int8-smoothquant"]


def write(tmp_path, text: str, name: str = "mine.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path, text: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    return str(info.value)


# --------------------------------------------------------------------------- shipped recipes

@pytest.mark.parametrize("name", [name for name, _ in list_recipes(ablations=True)])
def test_shipped_recipe_loads_and_round_trips(name):
    recipe = load_recipe(name)
    assert recipe.name == name.rsplit("/", 1)[-1]  # ablations/int8-gptq is named int8-gptq
    assert recipe.description and "\n" not in recipe.description
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert yaml.safe_load(recipe.to_yaml()) == recipe.to_dict()  # plain YAML, no python tags
    assert load_recipe(RECIPES_DIR / f"{name}.yaml") == recipe


def test_list_recipes_lists_every_shipped_recipe():
    listed = list_recipes()
    assert [name for name, _ in listed] == SHIPPED
    assert all(description for _, description in listed)
    ablations = sorted(f"{ABLATIONS}/{p.stem}" for p in (RECIPES_DIR / ABLATIONS).glob("*.yaml"))
    assert len(ablations) >= 16
    assert list_recipes(ablations=True) == sorted(listed + [(n, load_recipe(n).description) for n in ablations])


def test_ablation_names_and_paths(tmp_path, monkeypatch):
    recipe = load_recipe("ablations/int8-gptq")
    assert recipe.name == "int8-gptq" and recipe.scheme == "W8A8-INT8"
    assert load_recipe(RECIPES_DIR / "ablations" / "int8-gptq.yaml") == recipe
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("ablations/int8-nope")  # not shipped: a relative path, which does not exist
    with pytest.raises(RecipeError, match="no recipe named 'int8-gptq'"):
        load_recipe("int8-gptq")  # an ablation is named with its folder
    monkeypatch.chdir(tmp_path)  # a relative path that exists wins over the shipped name
    (tmp_path / "ablations").mkdir()
    (tmp_path / "ablations" / "int8-gptq").write_text("name: mine\nscheme: W8A16\n")
    assert load_recipe("ablations/int8-gptq").name == "mine"


def test_shipped_specs():
    assert load_recipe("w4a16-rtn").weights == IntSpec(4, True, 128)
    assert load_recipe("w4a16-rtn-g64").weights == IntSpec(4, True, 64)
    assert load_recipe("w4a16-rtn-asym").weights == IntSpec(4, False, 128)
    assert load_recipe("w8a16-rtn").weights == IntSpec(8, True, None)
    assert load_recipe("w3a16-rtn").weights == IntSpec(3, True, 128)
    default = load_recipe("w4a16-rtn")
    assert default.algorithms == (AlgorithmStep("rtn"),)
    assert default.calibration == CalibrationConfig()


def test_defaults_and_name_from_file_stem(tmp_path):
    recipe = load_recipe(write(tmp_path, "scheme: W8A16\n", "plain-w8.yaml"))
    assert recipe.name == "plain-w8"
    assert recipe.weights == SCHEMES["W8A16"]
    assert recipe == Recipe("plain-w8", scheme="W8A16", weights=SCHEMES["W8A16"])


def test_round_trip_with_options_and_overrides():
    data = {
        "name": "mixed",
        "weights": {"group_size": 64},
        "algorithms": ["smoothquant", {"gptq": {"dampening": 0.01, "order": ["a", "b"]}}],
        "overrides": [{"pattern": r"mlp\.down_proj$", "weights": {"bits": 8, "group_size": None}}],
        "calibration": {"num_samples": 4, "seqlen": 64},
    }
    recipe = Recipe.from_dict(data)
    assert recipe.algorithms[1].kwargs() == {"dampening": 0.01, "order": ("a", "b")}
    assert recipe.overrides[0].weights == (("bits", 8), ("group_size", None))
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    hash(recipe)  # frozen all the way down


def test_yaml_reads_exponent_floats(tmp_path):
    recipe = load_recipe(write(tmp_path, "algorithms: [{gptq: {dampening: 1e-3}}]\n"))
    assert recipe.algorithms[0].kwargs() == {"dampening": 0.001}


# --------------------------------------------------------------------------- errors

def test_unknown_top_level_key(tmp_path):
    msg = error_of(tmp_path, "scheme: W4A16\nalgorithm: [rtn]\n")
    assert "unknown key 'algorithm'" in msg and "mine.yaml" in msg
    assert "valid keys: activations, algorithms, budget, calibration, check, description, ignore, name" in msg


def test_unknown_weights_key_typo(tmp_path):
    msg = error_of(tmp_path, "weights: {grup_size: 64}\n")
    assert "unknown key 'grup_size'" in msg and "weights" in msg
    assert "valid keys: bits, group_size, scale_dtype, symmetric" in msg


def test_unknown_override_key(tmp_path):
    msg = error_of(tmp_path, "overrides: [{pattern: x, weights: {bitz: 8}}]\n")
    assert "unknown key 'bitz'" in msg and "overrides[0]" in msg
    assert "valid keys: bits, group_size, scale_dtype, symmetric" in msg


def test_bad_bits(tmp_path):
    msg = error_of(tmp_path, "weights: {bits: 9}\n")
    assert "bits" in msg and "9" in msg and "2..8" in msg


def test_bad_bits_in_override(tmp_path):
    msg = error_of(tmp_path, "overrides: [{pattern: down, weights: {bits: 9}}]\n")
    assert "overrides[0]" in msg and "bits" in msg and "9" in msg


def test_bits_contradicting_scheme(tmp_path):
    msg = error_of(tmp_path, "scheme: W4A16\nweights: {bits: 8}\n")
    assert "W4A16" in msg and "W8A16" in msg and "8" in msg


def test_bool_given_as_int(tmp_path):
    msg = error_of(tmp_path, "weights: {symmetric: 1}\n")
    assert "symmetric" in msg and "expected bool" in msg and "got 1" in msg


def test_int_given_as_bool(tmp_path):
    msg = error_of(tmp_path, "calibration: {num_samples: true}\n")
    assert "calibration.num_samples" in msg and "expected int" in msg and "True" in msg


def test_calibration_values(tmp_path):
    msg = error_of(tmp_path, "calibration: {seqlen: 0}\n")
    assert "calibration" in msg and "seqlen" in msg and "0" in msg


@pytest.mark.parametrize("key", ["targets", "ignore"])
def test_bad_regex(tmp_path, key):
    msg = error_of(tmp_path, f'{key}: ["mlp\\\\.(down"]\n')
    assert "invalid regex" in msg and repr(r"mlp\.(down") in msg and f"{key}[0]" in msg


def test_bad_regex_in_override(tmp_path):
    msg = error_of(tmp_path, 'overrides: [{pattern: "[", weights: {bits: 8}}]\n')
    assert "invalid regex '['" in msg and "overrides[0]" in msg


def test_unknown_scheme(tmp_path):
    msg = error_of(tmp_path, "scheme: W5A16\n")
    assert "unknown scheme 'W5A16'" in msg
    assert "valid schemes: W2A16, W3A16, W4A16, W8A16" in msg


def test_missing_recipe_lists_shipped():
    with pytest.raises(RecipeError) as info:
        load_recipe("w4a16-nope")
    assert "'w4a16-nope'" in str(info.value)
    assert all(name in str(info.value) for name in SHIPPED)
    with pytest.raises(RecipeError, match="does not exist.*w4a16-rtn"):
        load_recipe("/nowhere/at/all.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    msg = error_of(tmp_path, "name: x\nweights: {bits: 4\nscheme: W4A16\n")
    assert "mine.yaml" in msg and "invalid YAML" in msg and "line 3" in msg


def test_duplicate_yaml_key(tmp_path):
    msg = error_of(tmp_path, "scheme: W4A16\nscheme: W8A16\n")
    assert "duplicate key 'scheme'" in msg and "line 2" in msg


@pytest.mark.parametrize("text", ["", "- rtn\n", "just a string\n"])
def test_top_level_must_be_mapping(tmp_path, text):
    assert "top level must be a mapping" in error_of(tmp_path, text)


@pytest.mark.parametrize("text, words", [
    ("algorithms: rtn\n", ["algorithms", "expected a list"]),
    ("algorithms: []\n", ["at least one"]),
    ("algorithms: ['not an id']\n", ["identifier", "'not an id'"]),
    ("algorithms: [{gptq: {nested: {a: 1}}}]\n", ["'nested'", "scalar or list"]),
    ("algorithms: [{gptq: 1, awq: 2}]\n", ["algorithms[0]", "one-key mapping"]),
    ("targets: lm_head\n", ["targets", "expected list of str", "'lm_head'"]),
    ("overrides: [{pattern: x}]\n", ["overrides[0]", "missing key 'weights'"]),
    ("overrides: [{pattern: x, weights: {}}]\n", ["sets no field"]),
    ("weights: {group_size: 0}\n", ["group_size", "0"]),
    ("weights: {group_size: '64'}\n", ["group_size", "expected int or null", "'64'"]),
])
def test_other_mistakes(tmp_path, text, words):
    msg = error_of(tmp_path, text)
    assert all(w in msg for w in words), msg


def test_from_dict_requires_name():
    with pytest.raises(RecipeError, match="missing key 'name'"):
        Recipe.from_dict({"scheme": "W4A16"})


def test_recipe_error_is_value_error():
    assert issubclass(RecipeError, ValueError)


# --------------------------------------------------------------------------- parse_dataclass

@dataclass(frozen=True)
class _Inner:
    x: float = 1.0


@dataclass(frozen=True)
class _Options:
    dampening: float = 0.01
    act_order: bool = False
    blocks: int | None = None
    names: tuple[str, ...] = ()
    inner: _Inner = _Inner()

    def __post_init__(self):
        if self.dampening < 0:
            raise ValueError(f"dampening must be >= 0, got {self.dampening}")


def test_parse_dataclass_types():
    opts = parse_dataclass(_Options, {"dampening": 1, "act_order": True, "blocks": None,
                                      "names": ["q", "k"], "inner": {"x": 2}}, "gptq")
    assert opts == _Options(1.0, True, None, ("q", "k"), _Inner(2.0))
    assert isinstance(opts.dampening, float)
    assert parse_dataclass(_Options, {}, "gptq") == _Options()


@pytest.mark.parametrize("data, words", [
    ({"dampning": 0.1}, ["unknown key 'dampning' in gptq", "valid keys: act_order, blocks, "]),
    ({"act_order": 1}, ["gptq: act_order", "expected bool", "got 1"]),
    ({"blocks": 1.5}, ["gptq: blocks", "expected int or null", "1.5"]),
    ({"dampening": "0.1"}, ["gptq: dampening", "expected number", "'0.1'"]),
    ({"names": "q"}, ["gptq: names", "expected list of str"]),
    ({"names": ["q", 3]}, ["gptq: names[1]", "expected str", "got 3"]),
    ({"inner": {"y": 1}}, ["unknown key 'y' in gptq: inner", "valid keys: x"]),
    ({"dampening": -1}, ["gptq: dampening must be >= 0, got -1"]),
])
def test_parse_dataclass_errors(data, words):
    with pytest.raises(RecipeError) as info:
        parse_dataclass(_Options, data, "gptq")
    assert all(w in str(info.value) for w in words), str(info.value)


def test_algorithm_step_is_frozen_and_sorted():
    step = AlgorithmStep("gptq", {"b": [1, 2], "a": 0.5})
    assert step.options == (("a", 0.5), ("b", (1, 2)))
    assert step == AlgorithmStep("gptq", (("b", (1, 2)), ("a", 0.5)))
    assert step.to_yaml_data() == {"gptq": {"a": 0.5, "b": [1, 2]}}
    assert AlgorithmStep("rtn").to_yaml_data() == "rtn"


# --------------------------------------------------------------------------- spec_for

def test_spec_for_targets_ignore_overrides():
    recipe = Recipe.from_dict({
        "name": "t",
        "targets": [r"\.mlp\.", r"self_attn\.(q|k|v)_proj$"],
        "ignore": ["lm_head", r"layers\.0\.mlp\.gate_proj$"],
        "overrides": [
            {"pattern": r"mlp\.down_proj$", "weights": {"bits": 8}},
            {"pattern": r"layers\.0\.", "weights": {"bits": 6, "symmetric": False}},
        ],
    })
    base = IntSpec(4, True, 128)
    assert recipe.spec_for("model.layers.0.mlp.down_proj") == IntSpec(6, False, 128)  # later wins
    assert recipe.spec_for("model.layers.1.mlp.down_proj") == IntSpec(8, True, 128)
    assert recipe.spec_for("model.layers.1.mlp.up_proj") == base
    assert recipe.spec_for("model.layers.0.mlp.up_proj") == IntSpec(6, False, 128)
    assert recipe.spec_for("model.layers.0.mlp.gate_proj") is None  # ignored
    assert recipe.spec_for("model.layers.1.mlp.gate_proj") == base
    assert recipe.spec_for("model.layers.1.self_attn.q_proj") == base
    assert recipe.spec_for("model.layers.1.self_attn.o_proj") is None  # not targeted
    assert recipe.spec_for("lm_head") is None


def test_spec_for_default_recipe():
    recipe = load_recipe("w4a16-rtn")
    assert recipe.spec_for("model.layers.0.mlp.down_proj") == recipe.weights
    assert recipe.spec_for("lm_head") is None


def test_layer_override_direct():
    override = LayerOverride(r"down_proj$", {"group_size": None})
    assert override.apply(IntSpec()) == IntSpec(4, True, None)
    with pytest.raises(RecipeError, match="unknown key 'grup'.*valid keys: bits, group_size"):
        LayerOverride("x", {"grup": 1})


def test_scale_dtype_is_checked_and_kept_by_budget_candidates():
    recipe = Recipe.from_dict({"name": "s", "weights": {"scale_dtype": "bfloat16"},
                               "budget": {"bits_per_weight": 3.5, "candidates": ["w3g64", "w4g128"]}})
    assert recipe.weights.scale_dtype == "bfloat16"
    assert {s.scale_dtype for s in recipe.budget.specs(recipe.weights).values()} == {"bfloat16"}
    assert Recipe.from_yaml(recipe.to_yaml()).weights == recipe.weights
    with pytest.raises(RecipeError, match="scale_dtype must be one of float16, bfloat16, float32"):
        Recipe.from_dict({"name": "s", "weights": {"scale_dtype": "float8"}})
    with pytest.raises(RecipeError, match="scale_dtype is for weight-only schemes"):
        Recipe.from_dict({"name": "s", "scheme": "W8A8-INT8", "activations": {"dynamic": True},
                          "weights": {"scale_dtype": "float16"}})
