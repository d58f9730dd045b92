"""AWQ math: scale search, clipping, folding."""

from __future__ import annotations

import torch

from quantkit.algorithms.awq_math import output_error, search_clip, search_scales
from quantkit.algorithms.statistics import accumulate_hessian, make_hessian, scale_hessian
from quantkit.formats import IntSpec
from quantkit.formats.fake import fake_quantize_grouped


def _inputs(n=2048, in_f=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, in_f, generator=g)
    X[:, :4] *= 20  # salient input channels, as AWQ finds in LLMs
    H = make_hessian(in_f)
    accumulate_hessian(H, 0, X)
    return X, H, X.abs().mean(dim=0)


def _err(X, W, W_hat):
    return float(((X @ (W - W_hat).T) ** 2).sum())


def test_scale_search_beats_plain_rounding_where_channels_are_salient():
    X, H, x_mag = _inputs()
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(64, 128, generator=g), torch.randn(32, 128, generator=g)]
    spec = IntSpec(4, True, 32)
    found = search_scales(weights, H, x_mag, spec)
    assert found.alpha is not None and found.error < 0.9 * found.error_unscaled
    s = found.scales
    for W in weights:  # the reported error is what the scaled rounding really does on the tokens
        awq = fake_quantize_grouped(W * s, spec) / s
        assert _err(X, W, awq) < 0.9 * _err(X, W, fake_quantize_grouped(W, spec))


def test_scale_search_never_does_worse_than_plain_rounding():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(1024, 64, generator=g)  # no salient channels
    H = make_hessian(64)
    accumulate_hessian(H, 0, X)
    found = search_scales([torch.randn(16, 64, generator=g)], H, X.abs().mean(0), IntSpec(4, False, 32))
    assert found.error <= found.error_unscaled
    if found.alpha is None:
        assert torch.all(found.scales == 1)


def test_clip_search_lowers_each_groups_output_error():
    X, H, _ = _inputs(seed=3)
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(4))
    W[:, 7] *= 6  # an outlier weight column stretches its group's range
    spec = IntSpec(3, True, 32)
    clipped, mean_shrink = search_clip(W, H, spec)
    assert 0.5 <= mean_shrink < 1.0
    assert torch.all(clipped.abs() <= W.abs() + 1e-6)
    assert _err(X, W, fake_quantize_grouped(clipped, spec)) < _err(X, W, fake_quantize_grouped(W, spec))


def test_output_error_and_scaled_hessian_agree_with_the_tokens():
    X, H, _ = _inputs(n=512, in_f=32, seed=5)
    dW = torch.randn(8, 32)
    torch.testing.assert_close(output_error(dW, H).sum(), torch.tensor(2 * _err(X, dW, 0 * dW) / X.shape[0]), rtol=1e-4, atol=1e-3)
    s = torch.rand(32) + 0.5
    Hs = make_hessian(32)
    accumulate_hessian(Hs, 0, X / s)
    torch.testing.assert_close(scale_hessian(H, s), Hs, rtol=1e-4, atol=1e-4)


def test_a_rounder_confirms_the_scales_and_the_clip():
    """Under GPTQ the choices are scored by GPTQ itself: never worse than GPTQ
    on the unscaled / unclipped weights, and the reported errors are GPTQ's."""
    from quantkit.algorithms.awq import AWQ, AWQOptions
    from quantkit.algorithms.gptq import GPTQ, GPTQOptions
    from quantkit.algorithms.gptq_math import gptq_quantize

    X, H, x_mag = _inputs(seed=6)
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(64, 128, generator=g), torch.randn(32, 128, generator=g)]
    spec = IntSpec(4, False, 32)
    gptq = GPTQ(GPTQOptions(actorder="weight"))
    calls = []

    def rounder(ws, h, specs):
        calls.append(len(ws))
        return gptq.trial_round(ws, h, specs)

    found = search_scales(weights, H, x_mag, spec, rounder=rounder, confirm=2)
    assert len(calls) == 3  # unscaled + the two best grid points
    assert found.error <= found.error_unscaled
    W = torch.cat(weights)  # the unscaled error is what plain GPTQ does
    plain = gptq_quantize(W, H, spec, 0.01, 128, "weight").weight.dequantize(torch.float32)
    expect = (float(output_error(W - plain, H).sum()) / float(output_error(W, H).sum())) ** 0.5
    assert abs(found.error_unscaled - expect) < 1e-5

    awq = AWQ(AWQOptions())
    awq.observe(("w",), X)
    Wc = torch.randn(48, 128, generator=g)
    Wc[:, 7] *= 6
    H_awq = awq._stats["w"].hessian
    kept = awq.clip("w", Wc, spec, gptq.trial_rounder())
    err = [float(output_error(Wc - q, H_awq).sum()) for q in gptq.trial_round([Wc, kept], H_awq, [spec, spec])]
    assert err[1] <= err[0]
    assert (awq.report("w")["awq_clip_shrink"] == 1.0) == torch.equal(kept, Wc)


# --------------------------------------------------------------------------- in the driver

import pytest  # noqa: E402

from quantkit import api  # noqa: E402
from quantkit.algorithms.awq import AWQ, AWQOptions  # noqa: E402
from quantkit.algorithms.base import Scales  # noqa: E402
from quantkit.algorithms.folding import apply_transforms  # noqa: E402
from quantkit.checkpoint import load_checkpoint  # noqa: E402
from quantkit.checkpoint.report import layer_rows  # noqa: E402
from quantkit.models import load_model  # noqa: E402
from quantkit.forwards import capture_block_inputs, observe  # noqa: E402
from quantkit.pipeline import _input_groups, _targets, quantize_model  # noqa: E402
from quantkit.recipe import Recipe  # noqa: E402


class _FixedScales(AWQ):
    """AWQ whose scale search returns fixed random scales: every mapping gets folded."""

    def propose_scales(self, names, weights, specs, rounder):
        s = torch.rand(weights[0].shape[1], generator=torch.Generator().manual_seed(len(names))) * 3 + 0.2
        return Scales(scales=s, alpha=0.5)


def test_scaling_then_folding_leaves_the_float_block_unchanged(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    ids = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(loaded, ids, "cpu", 4)
    block = loaded.model.model.layers[0]
    with torch.inference_mode():
        before = block(inputs[0].hidden, **inputs[0].kwargs)
    before = before[0] if isinstance(before, tuple) else before
    recipe = Recipe.from_dict({"name": "t", "weights": {"group_size": 32}, "algorithms": ["awq", "rtn"]})
    targets = _targets(block, "model.layers.0", loaded.family.linears, recipe)
    awq = _FixedScales(AWQOptions(clip=False))
    observe(block, inputs, _input_groups(targets, loaded.family.shared_inputs), [awq], None, set())
    q_before = block.self_attn.q_proj.weight.detach().clone()
    steps: list[str] = []  # what the per-mapping progress bar shows
    apply_transforms(block, targets, loaded.family, [awq], None, steps.append)
    assert len(steps) == len(loaded.family.mappings) + 1 and steps[-1] == "awq clipping"
    assert not torch.equal(block.self_attn.q_proj.weight, q_before)  # scaled for real
    with torch.inference_mode():
        after = block(inputs[0].hidden, **inputs[0].kwargs)
    after = after[0] if isinstance(after, tuple) else after
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    # v -> o cannot fold under grouped-query attention: said so, for both linears' rows
    assert "grouped-query" in awq.report("model.layers.0.self_attn.o_proj")["awq_skipped"]


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_awq_stacks_with_rounding_and_reports_each_layer(tiny_model_dir, tmp_path, rounding):
    recipe = Recipe.from_dict({"name": f"awq-{rounding}", "weights": {"group_size": 32, "symmetric": False},
                               "algorithms": ["awq", rounding], "calibration": {"num_samples": 8, "seqlen": 32}})
    out = tmp_path / "ckpt"
    report = api.quantize(tiny_model_dir, recipe, out, show_progress=False)
    rows = {r["name"]: r for r in report["layers"]}
    assert len(rows) == 14
    assert all("awq_error_unscaled" in r or "awq_skipped" in r for r in rows.values())
    assert all("awq_clip_shrink" in r for n, r in rows.items() if not n.endswith(("q_proj", "k_proj")))
    assert all(r["algorithm"] == rounding for r in rows.values())
    loaded = load_checkpoint(out)
    assert loaded.model(torch.randint(0, 250, (1, 8))).logits.isfinite().all()


@pytest.mark.parametrize("bits,symmetric,group_size", [(3, True, None), (4, True, 48), (3, False, 16)])
def test_awq_takes_any_width_symmetry_and_group_size(tiny_model_dir, bits, symmetric, group_size):
    """Per-channel, a group size that leaves a partial last group (down_proj: 160 = 3 x 48 + 16), 3 and 4 bits:
    the transformed model still computes, and AWQ's choices are recorded for every linear."""
    recipe = Recipe.from_dict({"name": "awq-any", "scheme": f"W{bits}A16",
                               "weights": {"bits": bits, "group_size": group_size, "symmetric": symmetric},
                               "partial_groups": "keep",
                               "algorithms": ["awq", "rtn"], "calibration": {"num_samples": 4, "seqlen": 32}})
    loaded = load_model(tiny_model_dir)
    ids = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(1))
    result = quantize_model(loaded, recipe, ids)
    rows = layer_rows(result)
    assert {(r["bits"], r["symmetric"], r["group_size"]) for r in rows} == {(bits, symmetric, group_size)}
    assert all("awq_error" in r or "awq_skipped" in r for r in rows)
    assert loaded.model(ids[:1]).logits.isfinite().all()


def test_awq_alone_is_not_a_recipe():
    from quantkit.algorithms import build_all
    from quantkit.recipe import RecipeError

    with pytest.raises(RecipeError, match="rounding step"):
        build_all(Recipe.from_dict({"name": "t", "algorithms": ["awq"]}))


def test_awq_needs_calibration_data(tiny_model_dir):
    recipe = Recipe.from_dict({"name": "t", "algorithms": ["awq", "rtn"]})
    with pytest.raises(ValueError, match="calibration data"):
        quantize_model(load_model(tiny_model_dir), recipe, None)


# --------------------------------------------------------------------------- AWQ GEMM export

from quantkit.checkpoint.awq_export import AWQ_ORDER, pack_awq  # noqa: E402
from quantkit.errors import CheckpointError  # noqa: E402


def _unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """Written from the layout's description, independently of pack_awq."""
    fields = [(words.to(torch.int64) >> (4 * i)) & 0xF for i in range(8)]  # field i holds column 8c + ORDER[i]
    out = torch.zeros(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
    for i, column in enumerate(AWQ_ORDER):
        out[:, column::8] = fields[i]
    return out


def test_pack_awq_interleaves_eight_values_per_word():
    v = torch.arange(16).reshape(1, 16) % 16
    words = pack_awq(v)
    assert words.dtype == torch.int32 and words.shape == (1, 2)
    assert int(words[0, 0]) & 0xF == 0 and (int(words[0, 0]) >> 4) & 0xF == 2  # fields 0, 1 = columns 0, 2
    assert torch.equal(_unpack_awq(words), v)
    with pytest.raises(ValueError):
        pack_awq(torch.full((1, 8), 16))


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_export_dequantizes_to_the_same_weights(tiny_model_dir, tmp_path, symmetric):
    from safetensors.torch import load_file

    recipe = Recipe.from_dict({"name": "t", "weights": {"group_size": 32, "symmetric": symmetric}, "algorithms": ["rtn"]})
    src, dst = tmp_path / "ct", tmp_path / "awq"
    api.quantize(tiny_model_dir, recipe, src, show_progress=False)
    api.export(src, dst, "awq")
    cfg = __import__("json").loads((dst / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "awq" and cfg["version"] == "gemm" and cfg["group_size"] == 32
    state = load_file(dst / "model.safetensors")
    ours = load_checkpoint(src).model
    name = "model.layers.1.mlp.down_proj"
    module = ours.get_submodule(name)
    expected = module(torch.eye(module.in_features)).T  # dequantized weight [out, in] via our kernel
    q = _unpack_awq(state[f"{name}.qweight"])  # [in, out]
    z = _unpack_awq(state[f"{name}.qzeros"])  # [in / g, out]
    s = state[f"{name}.scales"].float()  # [in / g, out]
    w = ((q - z.repeat_interleave(32, dim=0)) * s.repeat_interleave(32, dim=0)).T
    torch.testing.assert_close(w, expected.float(), rtol=1e-3, atol=1e-4)  # scales go to float16
    if symmetric:
        assert torch.all(z == 8)


def test_awq_export_refuses_what_awq_cannot_hold(tiny_model_dir, tmp_path):
    recipe = Recipe.from_dict({"name": "t", "scheme": "W8A16", "weights": {"group_size": 32}, "algorithms": ["rtn"]})
    api.quantize(tiny_model_dir, recipe, tmp_path / "w8", show_progress=False)
    with pytest.raises(CheckpointError, match="4-bit"):
        api.export(tmp_path / "w8", tmp_path / "awq", "awq")
    assert not (tmp_path / "awq").exists()  # nothing half-written


def test_quantize_cli_summarizes_awq(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from quantkit.cli import app

    result = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "--recipe", "w4a16-awq", "--out", str(tmp_path / "o"),
                                      "--num-samples", "4", "--seqlen", "32"])
    text = result.output + (getattr(result, "stderr", "") or "")
    assert result.exit_code == 0, text
    assert "AWQ" in text and "grouped-query" in text


def test_equalized_magnitudes_give_every_token_the_same_say():
    from quantkit.algorithms.statistics import InputStatistics

    x = torch.ones(64, 8)
    x[0] = 0.0
    x[0, 3] = 1000.0  # one massive token on one channel
    plain = InputStatistics("AWQ", abs_mean=True)
    unit = InputStatistics("AWQ", abs_mean=True, equalize_abs_mean=True)
    plain.observe(("a",), x)
    unit.observe(("a",), x)
    m_plain, m_unit = plain["a"].abs_mean, unit["a"].abs_mean
    assert m_plain[3] / m_plain[0] > 15  # the one token sets channel 3's magnitude
    assert m_unit[3] / m_unit[0] < 1.2  # with unit rows it is one token of 64
    options = AWQOptions(equalize_magnitudes=True)
    assert AWQ(options)._stats.equalize_abs_mean
