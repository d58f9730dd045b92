"""GPTQ math on small random linears, and GPTQ through the driver, writer and reader."""

from __future__ import annotations

import json

import pytest
import torch

from quantkit import api
from quantkit.algorithms.gptq_math import gptq_quantize
from quantkit.algorithms.statistics import accumulate_hessian, equalize_tokens, make_hessian
from quantkit.checkpoint import load_checkpoint
from quantkit.formats import IntSpec, quantize_rtn
from quantkit.recipe import Recipe


def _layer(out_f=48, in_f=128, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    X = torch.randn(n, in_f, generator=g) @ mix  # correlated inputs, as in real activations
    X[:, :3] *= 8  # a few outlier channels
    H = make_hessian(in_f)
    count = 0
    for chunk in X.split(500):
        count = accumulate_hessian(H, count, chunk)
    return W, X, H


def _output_error(X, W, W_hat) -> float:
    return float(((X @ (W - W_hat).T) ** 2).mean())


def test_hessian_is_two_over_n_xtx_whatever_the_batching():
    _, X, H = _layer()
    torch.testing.assert_close(H, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-4)


SPECS = [IntSpec(4, True, 32), IntSpec(4, False, 64), IntSpec(3, True, 32), IntSpec(4, True, None), IntSpec(8, True, 32), IntSpec(4, True, 48)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("actorder", [None, "group", "weight"])
def test_gptq_output_error_below_rtn_for_the_same_hessian(spec, actorder):
    W, X, H = _layer()
    rtn = _output_error(X, W, quantize_rtn(W, spec).dequantize())
    result = gptq_quantize(W, H, spec, actorder=actorder)
    gptq = _output_error(X, W, result.weight.dequantize())
    assert gptq < 0.8 * rtn
    q = result.weight.q
    assert q.dtype == torch.int8 and int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    assert (result.weight.g_idx is not None) == (actorder == "group")


def test_equalize_tokens_gives_unit_rows_and_keeps_zero_rows():
    x = torch.randn(6, 16, dtype=torch.bfloat16)
    x[2] = 0
    x[4] *= 1000
    y = equalize_tokens(x)
    assert y.dtype == torch.float32
    norms = torch.linalg.vector_norm(y, dim=1)
    torch.testing.assert_close(norms[[0, 1, 3, 4, 5]], torch.ones(5))
    assert torch.all(y[2] == 0)
    torch.testing.assert_close(y[4], x[4].float() / x[4].float().norm())  # direction kept


def test_equalized_hessian_is_not_captured_by_massive_tokens():
    """A few "attention sink" tokens, 300x the norm of the rest in a few
    channels, dominate a plain Hessian: GPTQ then fits them and does little
    for ordinary tokens. With every token weighted equally it helps ordinary
    tokens (held-out ones, not the calibration rows) far more."""
    W, X, _ = _layer(n=4096, seed=1)
    g = torch.Generator().manual_seed(2)
    sinks = torch.zeros(40, X.shape[1])
    sinks[:, :4] = 300 * X.norm(dim=1).mean() * (1 + 0.1 * torch.randn(40, 4, generator=g))
    calib = torch.cat([X[:2048], sinks])[torch.randperm(2088, generator=g)]
    held_out = X[2048:]
    spec = IntSpec(4, True, 32)
    errors = {}
    for name, rows in {"plain": calib, "equal": equalize_tokens(calib)}.items():
        H = make_hessian(X.shape[1])
        accumulate_hessian(H, 0, rows)
        errors[name] = _output_error(held_out, W, gptq_quantize(W, H, spec).weight.dequantize())
    rtn = _output_error(held_out, W, quantize_rtn(W, spec).dequantize())
    assert errors["equal"] < 0.8 * errors["plain"]
    assert errors["equal"] < 0.8 * rtn


@pytest.mark.parametrize("actorder", [None, "weight", "group"])
def test_linears_sharing_a_hessian_are_solved_together_as_if_alone(actorder):
    """q/k/v share their input: one stacked solve must give each linear what
    its own solve gives (GPTQ's rows are independent given H)."""
    from quantkit.algorithms.gptq import GPTQ, GPTQOptions

    _, X, _ = _layer(seed=3)
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(n, X.shape[1], generator=g) for n in (48, 16, 16)]
    names = ["q", "k", "v"]
    spec = IntSpec(4, True, 32)
    algorithm = GPTQ(GPTQOptions(actorder=actorder))
    algorithm.observe(tuple(names), X)
    H = algorithm._stats["q"].hessian.clone()
    together = algorithm.round_group(names, weights, [spec] * 3)
    for name, w, qw in zip(names, weights, together):
        alone = gptq_quantize(w, H, spec, actorder=actorder)
        assert torch.equal(qw.q, alone.weight.q), name
        assert torch.equal(qw.scale, alone.weight.scale), name
        assert algorithm.report(name)["gptq_loss"] == pytest.approx(alone.loss, rel=1e-6)
        if actorder == "group":
            assert torch.equal(qw.g_idx, alone.weight.g_idx)


def test_act_order_group_g_idx_is_a_valid_grouping():
    W, _, H = _layer()
    spec = IntSpec(4, True, 32)
    qw = gptq_quantize(W, H, spec, actorder="group").weight
    counts = torch.bincount(qw.g_idx.long(), minlength=4)
    assert counts.tolist() == [32, 32, 32, 32]  # each group still has group_size columns
    # the heaviest input channel (largest diag H) is processed first: group 0
    assert int(qw.g_idx[torch.argmax(torch.diag(H))]) == 0


def test_dead_inputs_are_zeroed_and_rank_deficient_hessian_still_factors():
    W, X, _ = _layer(n=40)  # 40 samples < 128 inputs: H is singular without damping
    X[:, 5] = 0.0
    H = 2 * X.T @ X / X.shape[0]
    result = gptq_quantize(W, H, IntSpec(4, True, 32))
    assert result.dead_columns == 1
    assert torch.all(result.weight.dequantize()[:, 5] == 0)


def test_indefinite_hessian_retries_with_more_damping():
    W, _, H = _layer()
    H = H - 0.5 * torch.diag(H).mean() * torch.eye(H.shape[0])  # no longer positive definite at 1%
    result = gptq_quantize(W, H, IntSpec(4, True, 32), dampening=0.01)
    assert result.damping > 0.01


def _gptq_recipe(**options):
    return Recipe.from_dict({"name": "gptq-test", "weights": {"group_size": 32},
                             "algorithms": [{"gptq": options}], "calibration": {"num_samples": 8, "seqlen": 32}})


@pytest.mark.parametrize("actorder", [None, "group"])
def test_gptq_checkpoint_round_trips_through_writer_and_reader(tiny_model_dir, tmp_path, actorder):
    out = tmp_path / "q"
    options = {"actorder": actorder} if actorder else {}
    report = api.quantize(tiny_model_dir, _gptq_recipe(**options), out, show_progress=False)
    layer = next(r for r in report["layers"] if r["name"] == "model.layers.1.mlp.down_proj")
    assert layer["algorithm"] == "gptq" and layer["gptq_loss"] > 0 and 0 < layer["output_rel_error"] < 0.5
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] == actorder
    # dequantized weights read back equal what the driver left in the model
    loaded = load_checkpoint(out)
    module = loaded.model.get_submodule("model.layers.1.mlp.down_proj")
    assert (module.weight_g_idx is not None) == (actorder == "group")
    eye = torch.eye(module.in_features)
    read_back = module(eye).T
    from quantkit.models import load_model
    from quantkit.pipeline import quantize_model
    from quantkit.calibration import calibration_batch

    fresh = load_model(tiny_model_dir)
    recipe = _gptq_recipe(**options)  # the default calibration data, as api.quantize drew it
    ids = calibration_batch(fresh.tokenizer, recipe.calibration.data, 8, 32, 0)
    quantize_model(fresh, recipe, ids)
    torch.testing.assert_close(read_back, fresh.model.get_submodule("model.layers.1.mlp.down_proj").weight, rtol=0, atol=1e-6)


# compressed-tensors 0.20 refuses actorder "group" (g_idx checkpoints) and keeps
# "weight" (act-order processing with static contiguous groups): that is the one
# transformers can read. "group" checkpoints round-trip through our reader above.
def test_transformers_reads_an_act_order_weight_checkpoint(tiny_model_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    api.quantize(tiny_model_dir, _gptq_recipe(actorder="weight"), out, show_progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        b = load_checkpoint(out).model(ids).logits
    assert (a - b).abs().max().item() < 1e-4


def test_nan_activation_stops_with_the_layer_named(tiny_model_dir):
    """Finite weights whose activations turn NaN (here: the embedding's output made NaN by a
    hook; a NaN weight anywhere is refused before calibration, see test_quantize_checks)."""
    from quantkit.calibration import calibration_batch
    from quantkit.errors import NumericalError
    from quantkit.models import load_model
    from quantkit.pipeline import quantize_model

    loaded = load_model(tiny_model_dir)
    loaded.model.model.embed_tokens.register_forward_hook(lambda _m, _args, out: torch.full_like(out, float("nan")))
    ids = calibration_batch(loaded.tokenizer, "austen", 8, 32, 0)
    with pytest.raises(NumericalError, match=r"calibration input of model\.layers\.0\.self_attn\.q_proj"):
        quantize_model(loaded, _gptq_recipe(), ids)
