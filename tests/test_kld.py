"""KL divergence of a quantized model's next-token distributions from the float model's (issue 23)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from quantkit import api
from quantkit.eval.perplexity import divergence, perplexity
from test_bad_inputs import assert_clean_error, cli


def test_divergence_by_hand():
    ref = torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0]])  # P = (1/4, 3/4); then top-1 is token 0
    q = torch.tensor([[0.0, math.log(2.0)], [0.0, 2.0]])  # Q = (1/3, 2/3), same top-1; then token 1
    kl, changed = divergence(ref, q)
    p, r = torch.tensor([0.25, 0.75]), torch.tensor([1 / 3, 2 / 3])
    assert kl[0].item() == pytest.approx(float((p * (p / r).log()).sum()), rel=1e-5)
    assert changed.tolist() == [False, True]
    same, none = divergence(ref, ref)
    assert same.abs().max().item() == 0.0 and not none.any()


def test_a_model_against_itself_diverges_nowhere(tiny_model_dir):
    loaded = api.load(tiny_model_dir)
    tokens = torch.randint(0, loaded.model.config.vocab_size, (4 * 32,), generator=torch.Generator().manual_seed(0))
    r = perplexity(loaded.model, tokens, 32, None, 2, show_progress=False, reference=loaded.model)
    assert r.kld_mean == 0.0 and r.kld_p99 == 0.0 and r.top1_changed == 0.0
    plain = perplexity(loaded.model, tokens, 32, None, 2, show_progress=False)
    assert plain.perplexity == r.perplexity and plain.kld_mean is None


@pytest.fixture(scope="module")
def w3(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kld") / "w3"
    api.quantize(str(tiny_model_dir), "w3a16-rtn", out=out, show_progress=False)
    return out


def test_eval_kld_measures_the_quantized_model_against_its_float_model(w3, tiny_model_dir):
    rows = api.evaluate(w3, ("austen-eval",), seqlen=64, windows=4, show_progress=False, kld=True)
    (row,) = rows
    assert row["kld_reference"] == str(tiny_model_dir)
    assert 0 < row["kld_median"] <= row["kld_p99"] and 0 < row["kld_mean"]
    assert 0 < row["top1_changed"] < 1
    again = api.evaluate(w3, ("austen-eval",), seqlen=64, windows=4, show_progress=False, kld=str(tiny_model_dir))
    assert again[0]["kld_mean"] == row["kld_mean"]
    plain = api.evaluate(w3, ("austen-eval",), seqlen=64, windows=4, show_progress=False)
    assert "kld_mean" not in plain[0] and plain[0]["perplexity"] == row["perplexity"]


def test_eval_kld_in_the_cli_json(w3):
    result, text = cli("eval", w3, "--data", "austen-eval", "--windows", "2", "--seqlen", "64", "--kld", "--json")
    assert result.exit_code == 0, text
    out = json.loads(result.stdout)
    assert out["kld_mean"] > 0 and 0 <= out["top1_changed"] <= 1


def test_eval_kld_without_a_reference_is_one_clear_error(w3, tiny_model_dir, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(w3, moved)
    report = json.loads((moved / "quantization_report.json").read_text())
    report["model"] = str(tmp_path / "gone")
    (moved / "quantization_report.json").write_text(json.dumps(report))
    assert_clean_error(*cli("eval", moved, "--kld", "--windows", "1", "--seqlen", "64"), "--kld-reference", "is not here")
    assert_clean_error(*cli("eval", tiny_model_dir, "--kld", "--windows", "1", "--seqlen", "64"), "--kld-reference")
    assert_clean_error(*cli("eval", w3, "--kld-reference", str(tiny_model_dir)), "needs --kld")
