"""Every shipped recipe parses and runs on the tiny test model, end to end; so does every
benchmark variant under recipes/ablations."""

from __future__ import annotations

import json

import pytest
import torch

from quantkit import api
from quantkit import calibration as cal
from quantkit.checkpoint import load_checkpoint
from quantkit.recipe import list_recipes, load_recipe

ABLATIONS = [n for n, _ in list_recipes(ablations=True) if n not in dict(list_recipes())]


@pytest.fixture(scope="module")
def small_calibration_text(tmp_path_factory):
    """The first 40,000 characters of the bundled calibration text: tokenizing the whole
    3 MB corpus with the tiny model's tokenizer takes longer than an ablation's run."""
    path = tmp_path_factory.mktemp("calib") / "austen-head.txt"
    text = (cal.BUNDLED_DIR / cal.bundled_datasets()["austen"]["file"]).read_text("utf-8")
    path.write_text(text[:40_000], "utf-8")
    return path


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


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_recipe_runs(tiny_model_dir, tmp_path, small_calibration_text, name):
    out = tmp_path / "out"
    if name.startswith("ablations/rtn-budget-3.5"):  # its smallest candidate, W3 g64, takes 4 bits on the tiny model
        with pytest.raises(ValueError, match=r"3.5 bits per weight is below what the smallest candidate of every "
                                             r"linear takes \(4.000\)"):
            api.quantize(tiny_model_dir, name, out, calib_data=str(small_calibration_text), num_samples=4,
                         seqlen=32, show_progress=False)
        assert not out.exists()
        return
    report = api.quantize(tiny_model_dir, name, out, calib_data=str(small_calibration_text), num_samples=4,
                          seqlen=32, show_progress=False)
    assert len(report["layers"]) == (12 if "-keep-" in name else 14)  # keep-down / keep-o: one linear a block stays
    assert report["recipe"] == load_recipe(name).name
    model = load_checkpoint(out).model
    with torch.inference_mode():
        logits = model(torch.arange(12)[None]).logits
    assert torch.isfinite(logits).all()
