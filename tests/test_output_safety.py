"""What quantkit may replace, and what a killed run leaves behind.

Every test runs in a temporary sandbox. `--force` must never delete a folder
quantkit did not write: the input model's folder, a folder above it, the
current directory, the home folder, a filesystem root, a user's folder, or a
checkpoint a user has since added files to. Where a broken guard would do real
damage (the root), shutil.rmtree is replaced by a tripwire first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from quantkit.checkpoint import output as output_mod
from quantkit.checkpoint.output import MANIFEST_FILE, check_output, clean_stale, is_resumable, why_not_replaceable
from quantkit.errors import OutputError, OutputExistsError
from test_bad_inputs import assert_clean_error, assert_nothing_written, cli, snapshot


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "w4"
    result, text = cli("quantize", tiny_model_dir, "--out", out)
    assert result.exit_code == 0, text
    return out


@pytest.fixture
def model(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model, with a file of the user's beside its weights."""
    folder = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "NOTES.md").write_text("my notes")
    return folder


def _refused(result, text, *fragments):
    assert_clean_error(result, text, "refusing", *fragments)


# --------------------------------------------------------------------------- --force against the inputs

def test_force_onto_the_model_folder_is_refused(model):
    before = snapshot(model)
    _refused(*cli("quantize", model, "--out", model, "--force"), "is the input", str(model))
    assert snapshot(model) == before


def test_force_onto_a_folder_above_the_model_is_refused(model):
    above = model.parent.parent
    (above / "other.txt").write_text("keep")
    before = snapshot(above)
    _refused(*cli("quantize", model, "--out", above, "--force"), "contains the input")
    assert snapshot(above) == before


def test_output_inside_the_model_folder_is_refused(model):
    before = snapshot(model)
    _refused(*cli("quantize", model, "--out", model / "quantized"), "lies inside the input")
    assert snapshot(model) == before and not (model / "quantized").exists()


def test_force_onto_the_current_directory_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text("keep")
    monkeypatch.chdir(work)
    _refused(*cli("quantize", tiny_model_dir, "--out", ".", "--force"), "is the current directory")
    _refused(*cli("quantize", tiny_model_dir, "--out", "..", "--force"), "contains the current directory")
    assert (work / "data.txt").read_text() == "keep"


def test_force_onto_the_home_folder_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("keep")
    monkeypatch.setenv("HOME", str(home))
    _refused(*cli("quantize", tiny_model_dir, "--out", home, "--force"), "is your home folder")
    _refused(*cli("quantize", tiny_model_dir, "--out", "~", "--force"), "is your home folder")
    _refused(*cli("quantize", tiny_model_dir, "--out", tmp_path, "--force"), "contains your home folder")
    assert (home / ".bashrc").read_text() == "keep"


def test_force_onto_the_filesystem_root_is_refused(tiny_model_dir, monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError(f"rmtree{args} called")

    monkeypatch.setattr(output_mod.shutil, "rmtree", tripwire)
    _refused(*cli("quantize", tiny_model_dir, "--out", "/", "--force"), "filesystem root")


def test_force_onto_the_recipe_or_the_calibration_data_is_refused(tiny_model_dir, tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe = recipes / "mine.yaml"
    recipe.write_text("scheme: W4A16\n")
    _refused(*cli("quantize", tiny_model_dir, "--recipe", recipe, "--out", recipes, "--force"), "contains the input")
    data = tmp_path / "data"
    data.mkdir()
    (data / "text.txt").write_text("Some calibration text. " * 2000)
    _refused(*cli("quantize", tiny_model_dir, "--calib-data", data, "--out", data, "--force"), "is the input")
    assert recipe.read_text() == "scheme: W4A16\n" and (data / "text.txt").is_file()


# --------------------------------------------------------------------------- --force against other folders

def test_force_does_not_replace_a_users_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "results"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "table.csv").write_text("a,b\n")
    before = snapshot(out)
    result, text = cli("quantize", tiny_model_dir, "--out", out, "--force")
    assert_clean_error(result, text, "refusing to replace", "not written by quantkit")
    assert snapshot(out) == before


def test_force_does_not_replace_a_checkpoint_the_user_added_to(tiny_model_dir, checkpoint, tmp_path):
    out = tmp_path / "w4"
    shutil.copytree(checkpoint, out)
    (out / "eval-results.json").write_text("{}")
    before = snapshot(out)
    result, text = cli("quantize", tiny_model_dir, "--out", out, "--force")
    assert_clean_error(result, text, "refusing to replace", "did not write", "eval-results.json")
    assert snapshot(out) == before


def test_force_replaces_an_empty_folder_and_a_legacy_checkpoint(tiny_model_dir, checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert why_not_replaceable(empty) is None
    legacy = tmp_path / "legacy"  # written before the manifest: recognised by its report and its files
    shutil.copytree(checkpoint, legacy)
    (legacy / MANIFEST_FILE).unlink()
    assert why_not_replaceable(legacy) is None
    (legacy / "mine.txt").write_text("x")
    assert "mine.txt" in why_not_replaceable(legacy)
    (legacy / "mine.txt").unlink()
    for out in (empty, legacy):
        result, text = cli("quantize", tiny_model_dir, "--out", out, "--force")
        assert result.exit_code == 0, text
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        assert sorted(manifest["files"] + [MANIFEST_FILE]) == sorted(p.name for p in out.iterdir())


def test_a_file_added_during_the_run_stops_the_swap(checkpoint, tmp_path):
    out = tmp_path / "w4"
    shutil.copytree(checkpoint, out)
    with pytest.raises(OutputExistsError, match="changed during the run"):
        with output_mod.atomic_output(out, force=True) as tmp:
            (tmp / "config.json").write_text("{}")
            (out / "added-meanwhile.txt").write_text("keep")
    assert (out / "added-meanwhile.txt").read_text() == "keep" and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".w4.")]


def test_export_onto_its_own_checkpoint_is_refused(checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    before = snapshot(ckpt)
    _refused(*cli("export", ckpt, "--out", ckpt, "--force"), "is the input")
    _refused(*cli("export", ckpt, "--out", tmp_path, "--force"), "contains the input")
    assert snapshot(ckpt) == before


def test_unwritable_output_fails_before_loading(tiny_model_dir, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("quantkit.api.load_model", no_loading)
    result, text = cli("quantize", tiny_model_dir, "--out", "/proc/quantkit-out")
    assert_clean_error(result, text, "cannot create output", "/proc")


def test_check_output_in_python():
    with pytest.raises(OutputError, match="filesystem root"):
        check_output("/", force=True)
    assert issubclass(OutputExistsError, OutputError)


# --------------------------------------------------------------------------- what killed runs leave

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_runs_temporary_folder_is_removed_and_said(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{output_mod._HOST}-{_dead_pid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    live = tmp_path / f".out.tmp-{output_mod._HOST}-{os.getppid()}"  # a process that exists: left alone
    live.mkdir()
    other_host = tmp_path / ".out.tmp-elsewhere-1"  # another machine's run on a shared disk: left alone
    other_host.mkdir()
    result, text = cli("quantize", tiny_model_dir, "--out", out)
    assert result.exit_code == 0, text
    assert not stale.exists() and live.is_dir() and other_host.is_dir()
    notes = [line for line in text.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and str(stale) in notes[0] and "no longer exists" in notes[0]


def test_an_output_set_aside_by_a_killed_swap_is_put_back(checkpoint, tmp_path):
    out = tmp_path / "w4"
    pid = _dead_pid()
    old = tmp_path / f".w4.old-{output_mod._HOST}-{pid}"
    shutil.copytree(checkpoint, old)
    before = snapshot(old)
    tmp = tmp_path / f".w4.tmp-{output_mod._HOST}-{pid}"
    tmp.mkdir()
    done = clean_stale(out)
    assert len(done) == 2 and snapshot(out) == before
    assert not old.exists() and not tmp.exists()


def _held_cli(model, out: Path, module: str, function: str) -> subprocess.Popen:
    """The real CLI in a child process, held (asleep) once `module.function` has run."""
    script = textwrap.dedent(f"""
        import sys, time
        import {module} as where
        real = where.{function}
        def slow(*args, **kwargs):
            value = real(*args, **kwargs)
            print("HELD", flush=True)
            time.sleep(60)
            return value
        where.{function} = slow
        from quantkit.cli import app
        sys.argv = ["quantkit", "quantize", {str(model)!r}, "--out", {str(out)!r}]
        app()
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _sigterm_when_held(proc: subprocess.Popen) -> str:
    try:
        for line in proc.stdout:
            if line.startswith("HELD"):
                break
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return stderr


def test_sigterm_before_a_block_is_finished_removes_the_unfinished_output(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    proc = _held_cli(tiny_model_dir, out, "quantkit.pipeline", "capture_block_inputs")
    stderr = _sigterm_when_held(proc)
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    assert_nothing_written(out)


def test_sigterm_while_writing_keeps_the_finished_blocks_only_hidden(tiny_model_dir, tmp_path):
    """Interrupted in the final write: the output is not there, and the finished blocks are kept
    in the hidden temporary folder, with a note, for the same command to resume from."""
    out = tmp_path / "out"
    proc = _held_cli(tiny_model_dir, out, "quantkit.checkpoint.stream", "write_folder_files")
    stderr = _sigterm_when_held(proc)
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    assert not out.exists()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(kept) == 1 and is_resumable(kept[0]) and str(kept[0]) in stderr
