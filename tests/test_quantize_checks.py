"""quantize refuses bad input before the expensive part, refuses to write a broken
model, repeats itself exactly, and prints user text as it is.

Cheap checks are proven cheap by making the model load itself a failure: a test
that reaches it fails with "the model was loaded".
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantkit import api
from quantkit.checkpoint.writer import check_finite_state
from quantkit.errors import NumericalError
from quantkit.formats import QuantizedWeight
from test_bad_inputs import assert_clean_error, assert_nothing_written, cli, write_recipe


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("quantkit.api.load_model", refuse)
    monkeypatch.setattr("quantkit.api.load", refuse)


# --------------------------------------------------------------------------- cheap checks first

@pytest.mark.parametrize("device, fragment", [("tpu", "unknown device 'tpu'"), ("cuda:99", "cuda:99"),
                                              ("cpu:x", "unknown device")])
def test_bad_device_fails_before_loading(tiny_model_dir, tmp_path, no_loading, device, fragment):
    out = tmp_path / "out"
    assert_clean_error(*cli("quantize", tiny_model_dir, "--device", device, "--out", out), fragment)
    assert_nothing_written(out)


def test_group_size_that_does_not_divide_fails_before_loading(tiny_model_dir, tmp_path, no_loading):
    recipe = write_recipe(tmp_path, "scheme: W4A16\nweights: {group_size: 64}\npartial_groups: error\n")
    out = tmp_path / "out"
    # the tiny model's q/k/v/gate/up take 96 inputs: 96 % 64 != 0
    assert_clean_error(*cli("quantize", tiny_model_dir, "--recipe", recipe, "--out", out),
                       "model.layers.0.self_attn.q_proj", "96", "group_size 64")
    assert_nothing_written(out)


def test_recipe_selecting_no_layer_fails_before_loading(tiny_model_dir, tmp_path, no_loading):
    recipe = write_recipe(tmp_path, 'name: nothing\ntargets: ["nomatch"]\n')
    assert_clean_error(*cli("quantize", tiny_model_dir, "--recipe", recipe, "--out", tmp_path / "out"),
                       "selects no linear layer")


def test_calibration_beyond_the_context_fails_before_loading(tiny_model_dir, tmp_path, no_loading):
    out = tmp_path / "out"  # the tiny model's context: 256 positions
    assert_clean_error(*cli("quantize", tiny_model_dir, "--recipe", "w4a16-gptq", "--seqlen", 1000, "--out", out),
                       "1000", "context of 256")
    assert_nothing_written(out)


def test_calibration_that_cannot_fit_in_memory_fails_before_loading(tiny_model_dir, tmp_path, no_loading):
    out = tmp_path / "out"
    assert_clean_error(*cli("quantize", tiny_model_dir, "--recipe", "w4a16-gptq", "--num-samples", 10**8,
                            "--seqlen", 256, "--out", out), "GiB", "--num-samples")
    assert_nothing_written(out)


@pytest.mark.parametrize("args, fragment", [(("--windows", -3), "--windows"), (("--seqlen", 100000), "context of 256"),
                                            (("--seqlen", 1), "at least 2")])
def test_eval_ranges_fail_before_loading(tiny_model_dir, no_loading, args, fragment):
    assert_clean_error(*cli("eval", tiny_model_dir, *args), fragment)


def test_pickle_bearing_bin_model_is_refused_cleanly(tiny_model_dir, tmp_path):
    import pickle  # noqa: F401  (the payload below is only ever written, never loaded)

    from transformers import AutoModelForCausalLM

    folder = tmp_path / "binmodel"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    state = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict())
    state["payload"] = _Payload()
    torch.save(state, folder / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_clean_error(*cli("quantize", folder, "--out", out), "pickled Python objects", "safetensors")
    assert_nothing_written(out)


class _Payload:
    """What a malicious .bin file carries: an object whose unpickling runs code."""

    def __reduce__(self):
        return (print, ("code from a model file ran",))


def test_weight_index_pointing_outside_the_folder_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "../../../etc/passwd"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    assert_clean_error(*cli("quantize", folder, "--out", out), "points outside", "etc/passwd")
    assert_nothing_written(out)


def test_a_model_missing_a_weight_is_refused(tiny_model_dir, tmp_path):
    """transformers would fill the missing weight with random values and go on."""
    from safetensors.torch import save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    state = load_file(folder / "model.safetensors")
    del state["model.layers.0.mlp.down_proj.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_clean_error(*cli("quantize", folder, "--out", out), "lack", "model.layers.0.mlp.down_proj.weight")
    assert_nothing_written(out)


# --------------------------------------------------------------------------- nothing non-finite is written

@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"])
def test_nan_outside_the_linears_is_refused(tiny_model_dir, tmp_path, tensor):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_parameter(tensor).view(-1)[3] = float("nan")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    out = tmp_path / "out"
    assert_clean_error(*cli("quantize", folder, "--out", out), tensor, "NaN")
    assert_nothing_written(out)


def test_the_writer_checks_every_float_tensor():
    state = {"a.weight_packed": torch.zeros(2, 2, dtype=torch.int32), "a.bias": torch.tensor([1.0, float("inf")])}
    with pytest.raises(NumericalError, match="a.bias"):
        check_finite_state(state)
    check_finite_state({"a.bias": torch.ones(2), "b.weight": torch.ones(2, 2).to(torch.float8_e4m3fn)})


# --------------------------------------------------------------------------- the held-back perplexity check

def test_the_check_is_reported(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result, text = cli("quantize", tiny_model_dir, "--out", out, "--json")
    assert result.exit_code == 0, text
    held = json.loads(result.stdout)["held_out"]
    assert held["passed"] and held["windows"] == 4 and held["disjoint"]
    assert held["seqlen"] == 256  # the default: 4 windows of 256 tokens
    assert math.isclose(held["ratio"], held["quantized_perplexity"] / held["float_perplexity"])
    assert 0.5 < held["ratio"] < 2  # 4-bit weights on a random model barely move its perplexity
    stored = json.loads((out / "quantization_report.json").read_text())["held_out"]
    assert stored == held
    recipe = write_recipe(tmp_path, "scheme: W4A16\ncheck: {windows: 2, seqlen: 1000}\n")
    result, text = cli("quantize", tiny_model_dir, "--recipe", recipe, "--out", tmp_path / "long", "--json")
    held = json.loads(result.stdout)["held_out"]
    assert (held["windows"], held["seqlen"]) == (2, 256), text  # capped at the tiny model's context


def _break_rounding(monkeypatch, factor: float) -> None:
    """A quantizer gone wrong (AutoAWQ once wrote such models silently): every scale times `factor`."""
    import quantkit.algorithms.rtn as rtn

    real = rtn.quantize_rtn

    def broken(weight, spec):
        qw = real(weight, spec)
        return QuantizedWeight(qw.q, qw.scale * factor, qw.zero_point, qw.spec, qw.g_idx)

    monkeypatch.setattr(rtn, "quantize_rtn", broken)


# A random model predicts nearly uniformly whatever its blocks compute (its final norm and
# tiny tied embeddings see to that): even 50x scales move its perplexity by only a few
# percent. The bound below is tight enough for that to count as a blow-up on this model;
# the healthy rounding stays within it (checked first, as the control).
TIGHT = "scheme: W4A16\ncheck: {max_ratio: 1.01}\n"


def test_a_model_beyond_the_bound_is_not_written(tiny_model_dir, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, TIGHT)
    result, text = cli("quantize", tiny_model_dir, "--recipe", recipe, "--out", tmp_path / "healthy")
    assert result.exit_code == 0, text
    _break_rounding(monkeypatch, 50.0)
    out = tmp_path / "out"
    line = assert_clean_error(*cli("quantize", tiny_model_dir, "--recipe", recipe, "--out", out), "held-back",
                              "bound 1.01", "refusing to write", "--keep-degraded")
    assert_nothing_written(out)
    assert float(line.split("(ratio ")[1].split(",")[0]) > 1.01


def test_a_nan_model_is_not_written(tiny_model_dir, tmp_path, monkeypatch):
    """Refused as soon as the NaN scales reach the block's write (before the held-back check)."""
    _break_rounding(monkeypatch, float("nan"))
    out = tmp_path / "out"
    assert_clean_error(*cli("quantize", tiny_model_dir, "--out", out), "weight_scale", "NaN or Inf", "refusing to write")
    assert_nothing_written(out)


def test_a_model_beyond_the_bound_is_written_when_asked(tiny_model_dir, tmp_path, monkeypatch):
    _break_rounding(monkeypatch, 50.0)
    out = tmp_path / "out"
    result, text = cli("quantize", tiny_model_dir, "--recipe", write_recipe(tmp_path, TIGHT), "--out", out,
                       "--keep-degraded")
    assert result.exit_code == 0, text
    assert "FAILED" in text  # the summary table says so (its cells wrap)
    held = json.loads((out / "quantization_report.json").read_text())["held_out"]
    assert held["passed"] is False and held["ratio"] > held["max_ratio"] == 1.01


def test_no_check_when_the_recipe_says_so(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, "scheme: W4A16\ncheck: {windows: 0}\n")
    result, text = cli("quantize", tiny_model_dir, "--recipe", recipe, "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["held_out"] is None, text


# --------------------------------------------------------------------------- the same command, the same checkpoint

def test_the_same_quantize_gives_the_same_checkpoint(tiny_model_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result, text = cli("quantize", tiny_model_dir, "--recipe", "w4a16-gptq-actorder", "--num-samples", 8,
                           "--seqlen", 64, "--out", out)
        assert result.exit_code == 0, text
        runs.append(out)
    a, b = (load_file(out / "model.safetensors") for out in runs)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    recipes = [(out / "quantkit_recipe.yaml").read_text() for out in runs]
    assert recipes[0] == recipes[1] and "dtype: auto" not in recipes[0]
    report = json.loads((runs[0] / "quantization_report.json").read_text())
    assert report["calibration"]["dtype"] == report["calibration_dtype"] in ("float32", "bfloat16")


def test_auto_dtype_follows_the_hardware_not_a_timing(monkeypatch):
    from quantkit import devices

    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
        assert devices.calibration_dtype("auto", torch.float32, "cpu") == expected
    assert devices.calibration_dtype("auto", torch.float16, "cpu") == torch.float16
    assert devices.calibration_dtype("float32", torch.bfloat16, "cpu") == torch.float32


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    from quantkit import devices

    real_path = devices.Path
    for flags, expected in (("fpu avx2 avx512f", False), ("fpu avx512f avx512_bf16", True), ("fp asimd bf16", True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(devices, "Path", lambda p, info=info: info if p == "/proc/cpuinfo" else real_path(p))
        devices.cpu_has_native_bf16.cache_clear()
        assert devices.cpu_has_native_bf16() is expected
    devices.cpu_has_native_bf16.cache_clear()


# --------------------------------------------------------------------------- user text is not markup

def test_user_text_is_printed_as_it_is(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, "name: '[bold]mine[/x]'\nscheme: W4A16\n", name="[red]r.yaml")
    result, text = cli("quantize", tiny_model_dir, "--recipe", recipe, "--out", tmp_path / "[b]out")
    assert result.exit_code == 0, text
    assert "[bold]mine[/x]" in text and "[b]out" in text
    missing = tmp_path / "[/x]missing.yaml"
    assert_clean_error(*cli("quantize", tiny_model_dir, "--recipe", missing, "--out", tmp_path / "o"), "[/x]missing.yaml")
    bad_key = write_recipe(tmp_path, "scheme: W4A16\n'[/oops]': 1\n", name="k.yaml")
    assert_clean_error(*cli("quantize", tiny_model_dir, "--recipe", bad_key, "--out", tmp_path / "o"), "'[/oops]'")
