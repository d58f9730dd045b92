"""Fuzzing the checkpoint reader: a corrupted checkpoint loads, or raises a QuantkitError.

Starting from a valid checkpoint (the tiny Llama quantized with w4a16-rtn),
each example applies a few random mutations to config.json or to
model.safetensors (its length prefix, its JSON header, its data section) in a
fresh copy, then calls quantkit.api.load (and runs the model when it loads)
and quantkit.api.inspect. Anything but success or a QuantkitError fails the
test, as does an example that runs past the deadline.

The mutation operators live in scripts/fuzz.py (its checkpoint campaign runs
thousands more cases). QUANTKIT_FUZZ_EXAMPLES sets the number of examples
(default 300, about 3 s; deterministic: derandomize=True).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import signal
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import api
from quantkit.errors import QuantkitError

def _fuzz_script():
    """scripts/fuzz.py, the one home of the mutation operators (scripts/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("quantkit_fuzz_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


mutate = _fuzz_script().mutate_checkpoint_file


# --------------------------------------------------------------------------- the property

EXAMPLES = int(os.environ.get("QUANTKIT_FUZZ_EXAMPLES", "300"))
HANG_S = 60  # an example still running after this is a hang: fail it instead of waiting forever


class Hang(Exception):
    """An example ran past HANG_S."""


def _on_alarm(signum, frame):
    raise Hang(f"no answer after {HANG_S} s")


def check(folder: Path) -> dict[str, str]:
    """api.load (and a forward pass when it loads) and api.inspect on `folder`: 'ok' or the name of
    the QuantkitError each raised; any other exception propagates."""
    outcome = {}
    try:
        loaded = api.load(folder)
        with torch.inference_mode():
            loaded.model(torch.tensor([[1, 2, 3, 4]]))
        outcome["load"] = "ok"
    except QuantkitError as e:
        outcome["load"] = type(e).__name__
    try:
        api.inspect(folder)
        outcome["inspect"] = "ok"
    except QuantkitError as e:
        outcome["inspect"] = type(e).__name__
    return outcome


@pytest.fixture(scope="module")
def valid_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "ckpt"
    api.quantize(tiny_model_dir, "w4a16-rtn", out, show_progress=False)
    assert check(out) == {"load": "ok", "inspect": "ok"}  # and warms up the imports
    return out


@settings(max_examples=EXAMPLES, deadline=timedelta(seconds=5), derandomize=True, database=None)
@given(file=st.sampled_from(["config.json", "model.safetensors"]), seed=st.integers(0, 2**32 - 1),
       rounds=st.integers(1, 3))
def test_a_corrupted_checkpoint_loads_or_raises_a_quantkit_error(valid_checkpoint, file, seed, rounds):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        shutil.copytree(valid_checkpoint, folder)
        mutate(folder, file, seed, rounds)
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(HANG_S)
        try:
            outcome = check(folder)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    # inspect validates what load does (no tensor data): a checkpoint that loads also inspects
    assert outcome["load"] != "ok" or outcome["inspect"] == "ok", outcome
