"""Bad input gets a clear error and loses nothing.

Each test drives the real CLI in-process on the tiny random Llama and checks the
product promise: exit code 1, exactly one "error: ..." line naming the problem,
no traceback, and no output folder (or hidden `.<name>.tmp-*` / `.old-*`
folder) left behind; with --force, a failed run leaves the old output intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers.utils import logging as transformers_logging
from click.testing import Result
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.models.families import supported_model_types

runner = CliRunner()

# transformers binds its log handler to whatever sys.stderr is when it first
# configures logging; done inside a CliRunner call, later warnings would hit that
# closed stream and print "--- Logging error --- Traceback". Bind it here.
transformers_logging.get_logger("transformers")


# --------------------------------------------------------------------------- helpers

def cli(*args) -> tuple[Result, str]:
    """Run `quantkit ARGS`; return the result and everything it printed."""
    result = runner.invoke(app, [str(a) for a in args])
    text = result.output  # click >= 8.2: stdout and stderr interleaved; older: mixed by default
    try:
        stderr = result.stderr
    except ValueError:  # click < 8.2 with mix_stderr=True: stderr is already in output
        stderr = ""
    if stderr and stderr not in text:
        text += stderr
    return result, text


def assert_clean_error(result: Result, text: str, *fragments: str) -> str:
    """Exit 1 through the CLI's own error path, one error line holding every fragment."""
    assert result.exit_code == 1, f"exit {result.exit_code}: {text}"
    # An exception escaping the command also gives exit code 1 under CliRunner;
    # only typer.Exit (a SystemExit) is the clean path.
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}: {text}"
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not leftovers, f"hidden temporary folders left in {out.parent}: {leftovers}"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def corrupt(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "garbled-header":
        # the first 8 bytes are the little-endian header length; then the JSON header
        file.write_bytes((2**62).to_bytes(8, "little") + b"\xff{not json" + data[18:])
    else:
        raise AssertionError(how)


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def quantized_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model quantized once with w4a16-rtn through the CLI."""
    out = tmp_path_factory.mktemp("quantized") / "ckpt"
    result, text = cli("quantize", tiny_model_dir, "--recipe", "w4a16-rtn", "--out", out)
    assert result.exit_code == 0, text
    return out


@pytest.fixture(scope="module")
def nan_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with one NaN in model.layers.1.mlp.down_proj.weight."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("nan-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- 1. missing model path

def test_quantize_missing_model(tmp_path):
    out = tmp_path / "out"
    result, text = cli("quantize", "/nonexistent/model", "--out", out)
    assert_clean_error(result, text, "/nonexistent/model", "not found")
    assert_nothing_written(out)


def test_eval_missing_model():
    result, text = cli("eval", "/nonexistent")
    assert_clean_error(result, text, "/nonexistent", "not found")


# --------------------------------------------------------------------------- 2. not a model folder

def test_quantize_folder_without_config(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    result, text = cli("quantize", folder, "--out", out)
    assert_clean_error(result, text, str(folder), "config.json")
    assert_nothing_written(out)


def test_eval_folder_without_config(tmp_path):
    result, text = cli("eval", tmp_path)
    assert_clean_error(result, text, "config.json")


# --------------------------------------------------------------------------- 3. corrupted safetensors

@pytest.mark.parametrize("how", ["truncated", "garbled-header"])
def test_quantize_corrupted_safetensors(tiny_model_dir, tmp_path, how):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    corrupt(model / "model.safetensors", how)
    out = tmp_path / "out"
    result, text = cli("quantize", model, "--out", out)
    assert_clean_error(result, text, str(model))
    assert_nothing_written(out)


@pytest.mark.parametrize("how", ["truncated", "garbled-header"])
def test_eval_corrupted_quantized_checkpoint(quantized_dir, tmp_path, how):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(quantized_dir, ckpt)
    corrupt(ckpt / "model.safetensors", how)
    result, text = cli("eval", ckpt, "--seqlen", 32, "--windows", 1)
    assert_clean_error(result, text, "corrupted", "model.safetensors")


# --------------------------------------------------------------------------- 4. bad recipes

def test_recipe_typo_in_weights(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, "scheme: W4A16\nweights: {grup_size: 64}\n")
    out = tmp_path / "out"
    result, text = cli("quantize", tiny_model_dir, "--recipe", recipe, "--out", out)
    assert_clean_error(result, text, "'grup_size'", "group_size", "bits", "symmetric")
    assert_nothing_written(out)


def test_recipe_unknown_top_level_key(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, "scheme: W4A16\ncalibraton: {num_samples: 8}\n")
    out = tmp_path / "out"
    result, text = cli("quantize", tiny_model_dir, "--recipe", recipe, "--out", out)
    assert_clean_error(result, text, "'calibraton'", "calibration", "algorithms", "targets")
    assert_nothing_written(out)


def test_unknown_recipe_name(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result, text = cli("quantize", tiny_model_dir, "--recipe", "w4a16-rnt", "--out", out)
    assert_clean_error(result, text, "'w4a16-rnt'", "w4a16-rtn", "w8a16-rtn")
    assert_nothing_written(out)


def test_unknown_algorithm(tiny_model_dir, tmp_path):
    from quantkit.algorithms import ALGORITHMS

    recipe = write_recipe(tmp_path, "algorithms: [gptqq]\n")
    out = tmp_path / "out"
    result, text = cli("quantize", tiny_model_dir, "--recipe", recipe, "--out", out)
    assert_clean_error(result, text, "'gptqq'", *sorted(ALGORITHMS))
    assert_nothing_written(out)


# --------------------------------------------------------------------------- 5. unsupported architecture

@pytest.mark.parametrize("model_type, arch", [("falcon", "FalconForCausalLM"), ("gpt2", "GPT2LMHeadModel")])
def test_unsupported_architecture(tiny_model_dir, tmp_path, model_type, arch):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    edit_config(model, model_type=model_type, architectures=[arch])
    out = tmp_path / "out"
    result, text = cli("quantize", model, "--out", out)
    assert_clean_error(result, text, "unsupported", repr(model_type), *supported_model_types())
    assert_nothing_written(out)


def test_eval_unsupported_architecture(tiny_model_dir, quantized_dir, tmp_path):
    """Both a float folder and a quantized checkpoint claiming an unsupported type."""
    for source in (tiny_model_dir, quantized_dir):
        folder = tmp_path / source.name
        shutil.copytree(source, folder)
        edit_config(folder, model_type="falcon", architectures=["FalconForCausalLM"])
        result, text = cli("eval", folder, "--seqlen", 32, "--windows", 1)
        assert_clean_error(result, text, "unsupported", "'falcon'", *supported_model_types())


def test_unknown_model_type(tiny_model_dir, tmp_path):
    """A model_type transformers has never heard of still lists what quantkit supports."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    edit_config(model, model_type="not-a-real-arch", architectures=["NotARealForCausalLM"])
    out = tmp_path / "out"
    result, text = cli("quantize", model, "--out", out)
    assert_clean_error(result, text, "'not-a-real-arch'", *supported_model_types())
    assert_nothing_written(out)


# --------------------------------------------------------------------------- 6. existing output

def test_existing_output_without_force_is_untouched(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = snapshot(out)
    result, text = cli("quantize", tiny_model_dir, "--out", out)
    assert_clean_error(result, text, str(out), "already exists", "--force")
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def old_run(quantized_dir: Path, out: Path) -> dict[str, bytes]:
    """`out` holds an earlier quantkit checkpoint; returns its files' bytes."""
    shutil.copytree(quantized_dir, out)
    return snapshot(out)


def test_existing_output_with_force_is_replaced(tiny_model_dir, quantized_dir, tmp_path):
    out = tmp_path / "out"
    before = old_run(quantized_dir, out)
    result, text = cli("quantize", tiny_model_dir, "--recipe", "w8a16-rtn", "--out", out, "--force")
    assert result.exit_code == 0, text
    assert snapshot(out) != before and "quantkit_manifest.json" in snapshot(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_failed_run_with_force_keeps_old_output(nan_model_dir, quantized_dir, tmp_path):
    out = tmp_path / "out"
    before = old_run(quantized_dir, out)
    result, text = cli("quantize", nan_model_dir, "--out", out, "--force")
    assert_clean_error(result, text, "NaN")
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_write_failure_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """A run that fails while writing (disk full) removes its temporary folder."""
    monkeypatch.setattr("quantkit.checkpoint.writer.save_file", _disk_full)
    out = tmp_path / "out"
    result, text = cli("quantize", tiny_model_dir, "--out", out)
    assert_clean_error(result, text, "No space left on device")
    assert_nothing_written(out)


def test_write_failure_with_force_keeps_old_output(tiny_model_dir, quantized_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("quantkit.checkpoint.writer.save_file", _disk_full)
    out = tmp_path / "out"
    before = old_run(quantized_dir, out)
    result, text = cli("quantize", tiny_model_dir, "--out", out, "--force")
    assert_clean_error(result, text, "No space left on device")
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_failed_swap_with_force_restores_old_output(tiny_model_dir, quantized_dir, tmp_path, monkeypatch):
    """If the finished folder cannot be moved into place, the old output goes back."""
    rename = Path.rename

    def failing_rename(self, target):
        if self.name.startswith(".out.tmp-"):
            raise OSError(16, "Device or resource busy")
        return rename(self, target)

    out = tmp_path / "out"
    before = old_run(quantized_dir, out)
    monkeypatch.setattr(Path, "rename", failing_rename)
    result, text = cli("quantize", tiny_model_dir, "--out", out, "--force")
    assert_clean_error(result, text, "Device or resource busy")
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_output_parent_is_a_file(tiny_model_dir, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("in the way")
    out = blocker / "out"
    result, text = cli("quantize", tiny_model_dir, "--out", out)
    assert_clean_error(result, text, str(blocker), "not a folder")
    assert blocker.read_text() == "in the way"


def test_output_is_a_file(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a folder")
    result, text = cli("quantize", tiny_model_dir, "--out", out, "--force")
    assert_clean_error(result, text, str(out), "not a folder")
    assert out.read_text() == "not a folder"


# --------------------------------------------------------------------------- 7. NaN weights

def test_nan_weight_names_the_layer(nan_model_dir, tmp_path):
    out = tmp_path / "out"
    result, text = cli("quantize", nan_model_dir, "--out", out)
    assert_clean_error(result, text, "model.layers.1.mlp.down_proj", "NaN")
    assert_nothing_written(out)


# --------------------------------------------------------------------------- 8. recipe selecting no layer

def test_recipe_selecting_no_layer(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, 'name: nothing\ntargets: ["nomatch"]\n')
    out = tmp_path / "out"
    result, text = cli("quantize", tiny_model_dir, "--recipe", recipe, "--out", out)
    assert_clean_error(result, text, "'nothing'", "selects no linear layer")
    assert_nothing_written(out)


# --------------------------------------------------------------------------- 9. unsupported checkpoint format

def test_eval_unsupported_checkpoint_format(quantized_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(quantized_dir, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["format"] = "marlin-24"
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    result, text = cli("eval", ckpt, "--seqlen", 32, "--windows", 1)
    assert_clean_error(result, text, "'marlin-24'", "pack-quantized")


def test_eval_checkpoint_with_invalid_config_json(quantized_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(quantized_dir, ckpt)
    (ckpt / "config.json").write_text('{"model_type": "llama", ')
    result, text = cli("eval", ckpt, "--seqlen", 32, "--windows", 1)
    assert_clean_error(result, text, "config.json")


def test_eval_zero_batch_size(tiny_model_dir):
    result, text = cli("eval", tiny_model_dir, "--batch-size", 0, "--seqlen", 32, "--windows", 1)
    assert_clean_error(result, text, "batch_size", "0")


def test_eval_unknown_kv_cache_dtype(tiny_model_dir):
    result, text = cli("eval", tiny_model_dir, "--kv-cache-dtype", "int4", "--seqlen", 32, "--windows", 1)
    assert_clean_error(result, text, "kv_cache_dtype", "int4")


def test_eval_with_an_fp8_kv_cache_says_so(tiny_model_dir):
    result, text = cli("eval", tiny_model_dir, "--kv-cache-dtype", "fp8", "--data", "austen-eval", "--seqlen", 32,
                       "--windows", 2, "--json")
    assert result.exit_code == 0, text
    assert json.loads(result.stdout)["results"][0]["kv_cache_dtype"] == "fp8"


# --------------------------------------------------------------------------- 10. inspect

def test_inspect_missing_folder(tmp_path):
    missing = tmp_path / "does-not-exist"
    result, text = cli("inspect", missing)
    assert_clean_error(result, text, str(missing), "not found")


def test_inspect_folder_without_config(tmp_path):
    result, text = cli("inspect", tmp_path)
    assert_clean_error(result, text, "config.json")


def test_export_of_what_awq_cannot_hold_is_one_clean_error(tiny_model_dir, tmp_path):
    w8 = tmp_path / "w8"
    result, text = cli("quantize", tiny_model_dir, "--recipe", "w8a16-rtn", "--out", w8)
    assert result.exit_code == 0, text
    out = tmp_path / "awq"
    assert_clean_error(*cli("export", w8, "--format", "awq", "--out", out), "4-bit")
    assert_nothing_written(out)
    assert_clean_error(*cli("export", w8, "--format", "gguf", "--out", out), "unknown export format")
    assert_clean_error(*cli("export", tmp_path / "missing", "--out", out), "missing")


# --------------------------------------------------------------------------- eval --speed

def test_speed_runs_on_the_cpu_and_prints_json(tiny_model_dir):
    result, text = cli("eval", tiny_model_dir, "--speed", "--batch-sizes", "1,3", "--prompt-len", "8,20",
                       "--output-len", "5", "--device", "cpu", "--speculative", "ngram", "--json")
    assert result.exit_code == 0, text
    report = json.loads(result.stdout)
    rows = report["results"]
    assert [(r["batch"], r["prompt"]) for r in rows] == [(1, 8), (3, 8), (1, 20), (3, 20)] and report["device"] == "cpu"
    for r in rows:
        assert r["output_tokens"] == 5 * r["batch"] and r["tokens_per_s"] > 0
        assert r["itl_ms_p99"] >= r["itl_ms_p50"] >= 0 and r["ttft_ms_p50"] > 0
        assert 0 <= r["acceptance_rate"] <= 1 and 1 <= r["tokens_per_verify"] <= 5
        assert 0 <= r["kv_unused_fraction"] < 1 and r["kv_blocks_allocated_peak"] <= r["kv_blocks_total"]


@pytest.mark.parametrize("flag", [[], ["--async-decode"], ["--sync-decode"]], ids=["default", "async", "sync"])
def test_speed_with_and_without_async_decoding(tiny_model_dir, flag):
    result, text = cli("eval", tiny_model_dir, "--speed", "--batch-sizes", "2", "--prompt-len", "8",
                       "--output-len", "6", "--device", "cpu", *flag, "--json")
    assert result.exit_code == 0, text
    (row,) = json.loads(result.stdout)["results"]
    pipelined = flag != ["--sync-decode"]  # asynchronous by default
    assert row["async_decode"] == pipelined and (row["pipelined_steps"] > 0) == pipelined
    assert row["output_tokens"] == 12


@pytest.mark.parametrize("args,fragment", [
    (("--batch-sizes", "1,x"), "--batch-sizes"),
    (("--prompt-len", "8,"), "--prompt-len"),
    (("--speculative", "draft"), "--draft"),
    (("--speculative", "medusa"), "medusa"),
    (("--output-len", "0"), "at least 1"),
    (("--dtype", "float8"), "float8"),
])
def test_speed_refuses_bad_settings(tiny_model_dir, args, fragment):
    result, text = cli("eval", tiny_model_dir, "--speed", "--device", "cpu", *args)
    assert_clean_error(result, text, fragment)
