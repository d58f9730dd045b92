"""Activation quantization (int8 / FP8, per token or static) and SmoothQuant's smoothing."""

from __future__ import annotations

import pytest
import torch

from quantkit.algorithms.smoothquant import SmoothQuant, SmoothQuantOptions, outlier_ratio, smoothing_scales
from quantkit.formats.activation import (
    FP8_E4M3_MAX,
    ActSpec,
    dynamic_scales,
    fake_quantize,
    quantize,
    saturated_fraction,
    scale_for,
)


@pytest.mark.parametrize("kind,bound", [("int8", 0.5 / 127.5), ("fp8", 2.0**-4)])
def test_per_token_fake_quantization_error_is_within_half_a_step(kind, bound):
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 64)[:, None]
    spec = ActSpec(kind, dynamic=True)
    xq = fake_quantize(x, spec)
    absmax = x.abs().amax(dim=1, keepdim=True)
    # int8: half a step of absmax / 127.5; fp8 (3 mantissa bits): relative 2^-4 of each value, plus subnormals
    err = (xq - x).abs()
    limit = bound * absmax if kind == "int8" else bound * x.abs() + absmax / FP8_E4M3_MAX * 2.0**-9
    assert torch.all(err <= limit * (1 + 1e-4))
    assert torch.equal(xq.abs().amax(dim=1, keepdim=True) > 0, absmax > 0)


def test_fp8_is_torchs_e4m3_cast_and_int8_is_round_half_even():
    x = torch.tensor([[0.1, -3.0, 447.0, 500.0, -1000.0, 2.5]])
    s = torch.tensor(1.0)
    q8 = quantize(x, s, ActSpec("fp8"))
    assert q8.dtype == torch.float8_e4m3fn
    assert torch.equal(q8.to(torch.float32), x.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32))
    qi = quantize(x, s, ActSpec("int8"))
    assert qi.dtype == torch.int8 and qi.tolist() == [[0, -3, 127, 127, -128, 2]]  # 2.5 -> 2: ties to even


def test_zeros_nan_and_static_scales():
    spec = ActSpec("int8")
    x = torch.zeros(3, 8)
    assert torch.equal(fake_quantize(x, spec), x)  # a zero row: eps scale, exact zeros
    with pytest.raises(ValueError, match="NaN"):
        dynamic_scales(torch.tensor([[1.0, float("nan")]]), spec)
    static = ActSpec("fp8", dynamic=False)
    with pytest.raises(ValueError, match="calibrated scale"):
        fake_quantize(torch.ones(2, 2), static)
    s = scale_for(torch.tensor(4.0), static)  # calibrated on |x| <= 4
    y = torch.tensor([[1.0, 8.0, -2.0, 16.0]])
    assert saturated_fraction(y, s, static) == 0.5
    assert fake_quantize(y, static, s).tolist() == [[1.0, 4.0, -2.0, 4.0]]  # beyond the calibrated range: clamped
    with pytest.raises(ValueError):
        ActSpec("int4")


def test_smoothing_scales_follow_the_formula_and_leave_dead_channels_alone():
    a = torch.tensor([4.0, 1.0, 0.0, 9.0])
    W1 = torch.tensor([[1.0, -4.0, 2.0, 0.0], [0.5, 1.0, -1.0, 0.0]])
    W2 = torch.tensor([[-2.0, 1.0, 1.0, 0.0]])
    s = smoothing_scales(a, [W1, W2], alpha=0.5)
    expect = torch.tensor([(4.0 ** 0.5) / (2.0 ** 0.5), 1.0 / 2.0, 1.0, 1.0])  # max |W| over both: 2, 4; dead: 1
    torch.testing.assert_close(s, expect)
    a = torch.tensor([100.0, 1.0, 1.0, 1.0])  # one outlier channel, even weights: alpha 0.5 takes its square root
    s = smoothing_scales(a, [torch.ones(3, 4)], alpha=0.5)
    assert outlier_ratio(a) == 100.0 and abs(outlier_ratio(a / s) - 10.0) < 1e-5


# --------------------------------------------------------------------------- in the driver

from quantkit.algorithms.folding import apply_transforms  # noqa: E402
from quantkit.models import load_model  # noqa: E402
from quantkit.forwards import capture_block_inputs, observe  # noqa: E402
from quantkit.pipeline import _input_groups, _targets  # noqa: E402
from quantkit.recipe import Recipe  # noqa: E402


def _qkv_input(block, hidden):
    seen = {}
    handle = block.self_attn.q_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach().clone()))
    with torch.inference_mode():
        out = block(hidden[0].hidden, **hidden[0].kwargs)
    handle.remove()
    return (out[0] if isinstance(out, tuple) else out), seen["x"].flatten(0, -2)


def test_smoothing_keeps_the_float_block_and_flattens_an_injected_outlier(tiny_model_dir):
    """Inject an outlier channel the function-preserving way (norm weight x 60, the q/k/v
    columns / 60), then smooth: the float block is unchanged, the outlier ratio of the
    q/k/v input drops, and per-token int8 quantization of that input gets more accurate."""
    loaded = load_model(tiny_model_dir)
    ids = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(loaded, ids, "cpu", 4)
    block = loaded.model.model.layers[0]
    with torch.no_grad():
        block.input_layernorm.weight[5] *= 60
        for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
            lin.weight[:, 5] /= 60
    before, x_before = _qkv_input(block, inputs)

    recipe = Recipe.from_dict({"name": "t", "scheme": "W8A8-INT8", "algorithms": ["smoothquant", "rtn"]})
    targets = _targets(block, "model.layers.0", loaded.family.linears, recipe)
    sq = SmoothQuant(SmoothQuantOptions(alpha=0.5), recipe.activations)
    observe(block, inputs, _input_groups(targets, loaded.family.shared_inputs), [sq], None, set())
    apply_transforms(block, targets, loaded.family, [sq], None, config=loaded.model.config)
    after, x_after = _qkv_input(block, inputs)

    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    report = sq.report("model.layers.0.self_attn.q_proj")
    assert report["act_outlier_ratio"] > 20 > report["act_outlier_ratio_smoothed"]
    # v -> o folds under grouped-query attention too, the query heads of a group sharing one scale
    assert sq.report("model.layers.0.self_attn.o_proj")["smooth_alpha"] == 0.5

    def int8_output_error(x, W):  # what per-token int8 inputs do to the q projection
        return float(((fake_quantize(x, ActSpec("int8")) - x) @ W.T).norm() / (x @ W.T).norm())

    W_after = block.self_attn.q_proj.weight.detach()
    s = (x_before[0] / x_after[0]).nan_to_num(1.0)  # the smoothing the driver folded, per channel
    assert int8_output_error(x_after, W_after) < 0.5 * int8_output_error(x_before, W_after / s)


def test_grouped_query_attention_ties_the_query_heads_scales_and_keeps_the_block(tiny_model_dir):
    """v -> o under grouped-query attention (4 query heads on 2 value heads): inject an outlier in one
    value dimension (v's row x 40, o's columns / 40 for every query head reading it), smooth: o_proj's
    input scale is equal across the query heads of a group, the float block is unchanged, and the
    injected channel is divided back down. AWQ, which does not tie, reports the mapping as skipped."""
    from quantkit.algorithms.awq import AWQ, AWQOptions
    from quantkit.algorithms.folding import grouped_heads

    loaded = load_model(tiny_model_dir)
    config = loaded.model.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = config.hidden_size // heads
    assert kv < heads
    ids = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(1))
    inputs = capture_block_inputs(loaded, ids, "cpu", 4)
    block = loaded.model.model.layers[0]
    row = 1 * hd + 3  # value head 1, dimension 3: read by query heads 2 and 3
    with torch.no_grad():
        block.self_attn.v_proj.weight[row] *= 40
        for h in (2, 3):
            block.self_attn.o_proj.weight[:, h * hd + 3] /= 40
    before, _ = _qkv_input(block, inputs)
    tied = grouped_heads(config, heads * hd, kv * hd)
    assert tied.tolist()[2 * hd + 3] == tied.tolist()[3 * hd + 3] == row and tied.tolist()[3] == 3

    recipe = Recipe.from_dict({"name": "t", "scheme": "W8A8-INT8", "algorithms": ["smoothquant", "rtn"]})
    targets = _targets(block, "model.layers.0", loaded.family.linears, recipe)
    o_in = {}
    handle = block.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: o_in.setdefault("x", a[0].detach()))
    _qkv_input(block, inputs)
    handle.remove()
    sq = SmoothQuant(SmoothQuantOptions(alpha=0.5), recipe.activations)
    observe(block, inputs, _input_groups(targets, loaded.family.shared_inputs), [sq], None, set())
    o_before = block.self_attn.o_proj.weight.detach().clone()
    apply_transforms(block, targets, loaded.family, [sq], None, config=config)
    after, _ = _qkv_input(block, inputs)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert sq.report("model.layers.0.self_attn.o_proj")["smooth_alpha"] == 0.5
    s = block.self_attn.o_proj.weight.detach()[0] / o_before[0]  # the scale folded into o_proj's columns
    for c in range(heads * hd):  # one scale per value channel, whichever query head reads it
        assert torch.allclose(s[c], s[(tied == tied[c]).nonzero()[0, 0]], rtol=1e-5)
    assert float(s[2 * hd + 3]) > 3 * float(s.median())  # the injected channel is divided down the most
    x = o_in["x"].flatten(0, -2).abs().amax(dim=0)
    assert outlier_ratio(x / s) < outlier_ratio(x) / 3

    awq = AWQ(AWQOptions())
    loaded2 = load_model(tiny_model_dir)
    block2 = loaded2.model.model.layers[0]
    targets2 = _targets(block2, "model.layers.0", loaded2.family.linears, Recipe.from_dict(
        {"name": "a", "scheme": "W4A16", "algorithms": ["awq", "rtn"]}))
    observe(block2, capture_block_inputs(loaded2, ids, "cpu", 4), _input_groups(targets2, loaded2.family.shared_inputs),
            [awq], None, set())
    apply_transforms(block2, targets2, loaded2.family, [awq], None, config=config)
    assert "does not tie" in awq.report("model.layers.0.self_attn.o_proj")["awq_skipped"]


def test_smoothquant_then_rounding_writes_a_checkpoint(tiny_model_dir, tmp_path):
    from quantkit import api
    from quantkit.checkpoint import load_checkpoint

    recipe = Recipe.from_dict({"name": "sq-rtn", "scheme": "W8A8-INT8",
                               "algorithms": [{"smoothquant": {"alpha": 0.6}}, "rtn"],
                               "calibration": {"num_samples": 4, "seqlen": 32}})
    report = api.quantize(tiny_model_dir, recipe, tmp_path / "ckpt", show_progress=False)
    rows = {r["name"]: r for r in report["layers"]}
    assert all(r.get("smooth_alpha") == 0.6 or "smooth_skipped" in r for r in rows.values())
    assert all(r["activations"] == "int8 dynamic per-token" for r in rows.values())
    assert load_checkpoint(tmp_path / "ckpt").model(torch.randint(0, 250, (1, 8))).logits.isfinite().all()


def test_smoothquant_needs_quantized_activations():
    from quantkit.algorithms import build_all
    from quantkit.recipe import RecipeError

    with pytest.raises(RecipeError, match="16 bits.*W8A8"):
        build_all(Recipe.from_dict({"name": "x", "scheme": "W8A16", "algorithms": ["smoothquant", "rtn"]}))


def test_alpha_search_never_does_worse_than_no_smoothing_or_a_fixed_alpha():
    from quantkit.algorithms.smoothquant import search_alpha
    from quantkit.formats import IntSpec

    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=g)
    x[:, 3] *= 80  # an outlier channel
    W = torch.randn(48, 64, generator=g)
    spec = IntSpec(8, True, None)
    alpha, s, err, plain = search_alpha(x, x.abs().amax(0), [W], [spec], ActSpec("int8"), grid=10, equalize=False)
    assert err <= plain and alpha in [k / 10 for k in range(11)]
    fixed = smoothing_scales(x.abs().amax(0), [W], 0.5)
    xq = fake_quantize(x / fixed, ActSpec("int8"))
    from quantkit.formats.fake import fake_quantize_grouped

    err_fixed = float((xq @ fake_quantize_grouped(W * fixed, spec).T - x @ W.T).norm() / (x @ W.T).norm())
    assert err <= err_fixed + 1e-7 and err < 0.5 * plain


def test_alpha_search_weighs_every_token_alike_and_may_choose_no_smoothing():
    """A few huge tokens (attention sinks) must not decide alpha alone; and where
    smoothing only hurts, the search folds nothing (alpha None, s = 1)."""
    from quantkit.algorithms.smoothquant import search_alpha
    from quantkit.formats import IntSpec

    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 64, generator=g)
    x[:, 3] *= 40
    x[:4] *= 500  # sink tokens
    W = torch.randn(48, 64, generator=g)
    spec = IntSpec(8, True, None)
    from quantkit.formats.fake import fake_quantize_grouped

    def per_token(s):  # squared output error of each token relative to its own output
        y = fake_quantize(x / s, ActSpec("int8")) @ fake_quantize_grouped(W * s, spec).T
        return ((y - x @ W.T).norm(dim=1) / (x @ W.T).norm(dim=1)).pow(2)

    _, s_eq, _, _ = search_alpha(x, x.abs().amax(0), [W], [spec], ActSpec("int8"), equalize=True)
    _, s_raw, _, _ = search_alpha(x, x.abs().amax(0), [W], [spec], ActSpec("int8"), equalize=False)
    assert per_token(s_eq).mean() <= per_token(s_raw).mean() + 1e-9
    flat = torch.randn(256, 64, generator=g)  # no outliers, 8-bit weights: nothing to gain
    alpha, s, err, plain = search_alpha(flat, flat.abs().amax(0), [W], [IntSpec(2, True, None)], ActSpec("int8"))
    assert err <= plain and (alpha is not None or torch.equal(s, torch.ones(64)))


def test_alpha_search_in_a_recipe(tiny_model_dir, tmp_path):
    from quantkit import api

    for scheme, acts in (("W8A8-INT8", {"dynamic": False}), ("W8A8-FP8", {"dynamic": True})):
        recipe = Recipe.from_dict({"name": "sq-search", "scheme": scheme, "activations": acts,
                                   "algorithms": [{"smoothquant": {"alpha": "search", "sample_tokens": 64}}, "rtn"],
                                   "calibration": {"num_samples": 4, "seqlen": 32}})
        report = api.quantize(tiny_model_dir, recipe, tmp_path / scheme, show_progress=False)
        searched = [r for r in report["layers"] if "smooth_error" in r]
        assert searched and all(r["smooth_error"] <= r["smooth_error_unsmoothed"] for r in searched)
    from quantkit.algorithms import build_all
    from quantkit.recipe import RecipeError

    for bad in ("best", 2.0):
        with pytest.raises(RecipeError, match="alpha"):
            build_all(Recipe.from_dict({"name": "x", "algorithms": [{"smoothquant": {"alpha": bad}}, "rtn"]}))


def test_statistics_keep_the_maxima_of_the_rows_they_did_not_sample():
    from quantkit.algorithms.statistics import InputStatistics

    stats = InputStatistics("t", absmax=True, sample_tokens=16)  # 16 / 8 = 2 rows from each of the first 8 batches
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 10, 6, generator=g) for _ in range(12)]
    for b in batches:
        stats.observe(("a",), b.flatten(0, 1))
    group = stats["a"]
    rows = [b.flatten(0, 1) for b in batches]
    sampled = torch.cat([r[::10][:2] for r in rows[:8]])
    assert torch.equal(torch.cat(group.samples), sampled)
    rest = torch.cat([torch.cat([r[:0], r[1:10], r[11:]]) for r in rows[:8]] + rows[8:])  # rows 0 and 10 sampled
    assert torch.equal(group.absmax, torch.cat(rows).abs().amax(0))
    assert torch.equal(group.absmax_unsampled, rest.abs().amax(0))
    s = torch.linspace(1, 2, 6)
    stats.fold("a", s)
    torch.testing.assert_close(group.absmax_unsampled, rest.abs().amax(0) / s)


def test_the_static_search_scores_its_sample_against_ranges_the_sample_did_not_set():
    from quantkit.algorithms.smoothquant import search_alpha
    from quantkit.formats import IntSpec

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) * torch.logspace(-1, 1, 64)
    W = torch.randn(32, 64, generator=g)
    full = x.abs().amax(0)
    act, spec = ActSpec("int8", dynamic=False), IntSpec(8, True, None)
    plain = search_alpha(x, full, [W], [spec], act)
    same = search_alpha(x, full, [W], [spec], act, held_absmax=full)  # the same ranges: the same search
    assert same[0] == plain[0] and torch.equal(same[1], plain[1]) and same[2] == plain[2]
    alpha, s, err, _ = search_alpha(x, full, [W], [spec], act, held_absmax=full * 0.6)
    assert err > 2 * plain[2]  # the sample now saturates: its tokens are scored as unseen text
    # the scales returned are the chosen alpha's from every calibration token's maxima
    expected = torch.ones(64) if alpha is None else smoothing_scales(full, [W], alpha)
    assert torch.equal(s, expected)
    # a dynamic (per-token) scheme has no ranges to hold out
    dyn = ActSpec("int8", dynamic=True)
    a, b = search_alpha(x, full, [W], [spec], dyn, held_absmax=full * 0.6), search_alpha(x, full, [W], [spec], dyn)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2]
