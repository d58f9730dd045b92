"""Every shipped recipe parses and runs on the tiny test model, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from quantkit import api
from quantkit.checkpoint import load_checkpoint
from quantkit.recipe import list_recipes


@pytest.mark.parametrize("name", [n for n, _ in list_recipes()])
def test_shipped_recipe_runs(tiny_model_dir, tmp_path, name):
    out = tmp_path / name
    report = api.quantize(tiny_model_dir, name, out, num_samples=4, seqlen=32, show_progress=False)
    assert len(report["layers"]) == 14
    assert (out / api.ERROR_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "quantization_report.json").read_text())["recipe"] == name
    model = load_checkpoint(out).model
    with torch.inference_mode():
        logits = model(torch.arange(12)[None]).logits
    assert torch.isfinite(logits).all()
