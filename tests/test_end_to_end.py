"""The real thing: SmolLM2-135M-Instruct quantized by the CLI, evaluated, and
loaded by transformers. About two minutes on 2 CPU cores."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from quantkit.checkpoint import load_checkpoint
from quantkit.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "smollm2-w4a16-rtn-g64"
    result = CliRunner().invoke(app, ["quantize", "--recipe", "w4a16-rtn-g64", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_quantize_report(checkpoint):
    out, report = checkpoint
    assert report["layers"] == 30 * 7
    assert report["bytes_quantized"] < report["bytes_float"] / 6  # 4-bit + fp32 scales per 64
    assert (out / "model.safetensors").is_file() and (out / "quantkit_recipe.yaml").is_file()
    layers = json.loads((out / "quantization_report.json").read_text())["layers"]
    assert all(r["group_size"] == 64 and r["bits"] == 4 for r in layers)
    assert all(0.0 < r["weight_rel_error"] < 0.3 for r in layers)


def test_eval_quantized_beside_float(checkpoint):
    out, _ = checkpoint
    result = CliRunner().invoke(app, ["eval", str(out), "--baseline", "default", "--data", "austen-eval", "--windows", "3", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    float_ppl, quant_ppl = rows[0]["perplexity"], rows[1]["perplexity"]
    assert rows[1]["windows"] == 3 and rows[1]["tokens"] == 3 * 511
    assert 5 < float_ppl < 100
    # 4-bit RTN costs some perplexity, but not most of the model
    assert float_ppl < quant_ppl < 1.6 * float_ppl


def test_transformers_reads_the_same_model(checkpoint):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out, _ = checkpoint
    ours = load_checkpoint(out)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = ours.tokenizer("It was a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.inference_mode():
        a, b = ours.model(ids).logits, theirs(ids).logits
    assert (a - b).abs().max().item() < 1e-3
    assert torch.equal(a.argmax(-1), b.argmax(-1))
