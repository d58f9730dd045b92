"""W8A8 (int8 and FP8 E4M3): FP8 weights, the W8A8 kernel entry point, the
driver's static input scales, and int-quantized / float-quantized checkpoints
read back by us and by transformers + compressed-tensors."""

from __future__ import annotations

import json

import pytest
import torch

from quantkit import api
from quantkit.checkpoint import load_checkpoint
from quantkit.errors import CheckpointError
from quantkit.formats import ActSpec, FloatSpec, IntSpec, quantize_rtn
from quantkit.formats.activation import fake_quantize as fake_quantize_input
from quantkit.kernels import prepare_w8a8, w8a8_matmul
from quantkit.kernels.w8a8 import w8a8_matmul_quantized
from quantkit.nn import W8A8Linear
from quantkit.recipe import Recipe, RecipeError, load_recipe

IDS = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))

# scheme, weights edits, activations edits
SCHEMES = {
    "int8-dynamic": ("W8A8-INT8", {}, {"dynamic": True}),
    "int8-static": ("W8A8-INT8", {}, {"dynamic": False}),
    "fp8-dynamic": ("W8A8-FP8", {"strategy": "channel"}, {"dynamic": True}),
    "fp8-static-tensor": ("W8A8-FP8", {"strategy": "tensor"}, {"dynamic": False}),
    "int8-static-mse": ("W8A8-INT8", {}, {"dynamic": False, "observer": "mse"}),
}


def _recipe(key: str, algorithms=("rtn",), **extra) -> Recipe:
    scheme, weights, acts = SCHEMES[key]
    return Recipe.from_dict({"name": key, "scheme": scheme, "weights": weights, "activations": acts,
                             "algorithms": list(algorithms), "calibration": {"num_samples": 8, "seqlen": 32}, **extra})


# ----------------------------------------------------------------- FP8 weights

@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_fp8_weights_are_the_e4m3_cast_of_w_over_the_absmax_scale(strategy):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g) * torch.logspace(-2, 1, 24)[:, None]
    w[3] = 0.0  # a dead row quantizes to exact zeros
    qw = quantize_rtn(w, FloatSpec(strategy))
    assert qw.q.dtype == torch.float8_e4m3fn and qw.scale.shape == ((24, 1) if strategy == "channel" else (1, 1))
    absmax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1, 1)
    torch.testing.assert_close(qw.scale[absmax > 0], (absmax / 448)[absmax > 0])
    assert torch.equal(qw.q.float(), (w / qw.scale).to(torch.float8_e4m3fn).float())
    assert qw.q.float().abs().max() == 448  # the largest value of each scale's range is exact
    deq = qw.dequantize()
    assert torch.equal(deq[3], torch.zeros(40))
    live = w.abs() > absmax * 2**-6  # normal E4M3 range: 3 mantissa bits -> relative error <= 2^-4
    assert ((deq - w).abs() <= w.abs() * 2**-4 + 1e-12)[live].all()


def test_fp8_weights_reject_nan():
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_rtn(w, FloatSpec())


# ----------------------------------------------------------------- the kernel entry point

def _prepared(w: torch.Tensor, key: str, x_calib: torch.Tensor | None = None):
    _, weights, acts = SCHEMES[key]
    spec = FloatSpec(**weights) if key.startswith("fp8") else IntSpec(8, True, None)
    act = ActSpec("fp8" if key.startswith("fp8") else "int8", acts["dynamic"])
    qw = quantize_rtn(w, spec)
    input_scale = None if act.dynamic else (x_calib.abs().amax() / act.half_range).reshape(1)
    return qw, act, input_scale, prepare_w8a8(qw.q, qw.scale, input_scale, spec, act)


@pytest.mark.parametrize("key", SCHEMES)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_reference_kernel_is_quantized_input_times_dequantized_weight(key, m):
    g = torch.Generator().manual_seed(m)
    w, x, bias = torch.randn(48, 64, generator=g), torch.randn(3, m, 64, generator=g), torch.randn(48, generator=g)
    x[..., 7] *= 30  # an outlier channel
    qw, act, input_scale, prepared = _prepared(w, key, x)
    y = w8a8_matmul(x, prepared, bias)
    expected = fake_quantize_input(x, act, input_scale) @ qw.dequantize().T + bias
    assert y.shape == (3, m, 48)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    # and it is a quantization: not the float product
    assert (y - (x @ w.T + bias)).abs().max() > 1e-3


def _quantized_input(x2: torch.Tensor, act: ActSpec, input_scale: torch.Tensor | None):
    """x2 quantized as the engine's quantizing ops write it: (q, s [M, 1])."""
    from quantkit.formats.activation import dynamic_scales, quantize

    s = dynamic_scales(x2, act) if act.dynamic else input_scale.to(x2.device).reshape(1, 1).expand(x2.shape[0], 1)
    s = s.float().contiguous()
    return quantize(x2, s, act), s


@pytest.mark.parametrize("key", SCHEMES)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_prequantized_matmul_is_the_matmul_after_its_own_quantization(key, m):
    """w8a8_matmul_quantized on the input w8a8_matmul would quantize: the same bits."""
    g = torch.Generator().manual_seed(m)
    w, x, bias = torch.randn(48, 64, generator=g), torch.randn(m, 64, generator=g), torch.randn(48, generator=g)
    _, act, input_scale, prepared = _prepared(w, key, x)
    xq, sx = _quantized_input(x, act, input_scale)
    for b in (bias, None):
        assert torch.equal(w8a8_matmul_quantized(xq, sx, prepared, b, x.dtype), w8a8_matmul(x, prepared, b))
    assert w8a8_matmul_quantized(xq, sx, prepared, None, torch.bfloat16).dtype == torch.bfloat16


def test_prequantized_matmul_refuses_inputs_of_another_shape_or_type():
    _, act, _, prepared = _prepared(torch.randn(16, 32), "fp8-dynamic")
    xq, sx = _quantized_input(torch.randn(3, 32), act, None)
    with pytest.raises(ValueError, match=r"float8_e4m3fn input \[M, 32\], got torch.int8"):
        w8a8_matmul_quantized(xq.view(torch.int8), sx, prepared)
    with pytest.raises(ValueError, match=r"got .* \(3, 31\)"):
        w8a8_matmul_quantized(xq[:, :31], sx, prepared)
    with pytest.raises(ValueError, match=r"sx must be float32 \[3, 1\]"):
        w8a8_matmul_quantized(xq, sx[:2], prepared)


def test_int8_reference_accumulates_exact_integers():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(16, 256, generator=g), torch.randn(4, 256, generator=g)
    qw, act, _, prepared = _prepared(w, "int8-dynamic")
    sx = x.abs().amax(dim=1, keepdim=True) / 127.5
    xq = torch.round(x / sx).clamp(-128, 127).to(torch.int8)
    exact = torch._int_mm(xq, qw.q.T.contiguous()).double() * sx.double() * qw.scale.double().T
    torch.testing.assert_close(w8a8_matmul(x, prepared).double(), exact, rtol=1e-6, atol=1e-6)


def test_static_inputs_saturate_and_are_counted():
    layer = W8A8Linear(8, 4, FloatSpec("tensor"), ActSpec("fp8", dynamic=False))
    layer.weight.copy_(torch.ones(4, 8).to(torch.float8_e4m3fn))
    layer.input_scale.fill_(1.0 / 448)  # representable range: |x| <= 1
    layer.track_saturation = True
    x = torch.tensor([[0.5, -2.0, 0.25, 3.0, 0.0, 0.0, 0.0, 0.0]])
    y = layer(x)
    torch.testing.assert_close(y, torch.full((1, 4), 0.5 - 1.0 + 0.25 + 1.0))  # -2 -> -1, 3 -> 1
    assert int(layer.saturated) == 2 and layer.seen == 8


def test_kernel_refuses_bad_inputs_with_readable_errors():
    w = torch.randn(16, 32)
    qw, act, _, prepared = _prepared(w, "int8-dynamic")
    with pytest.raises(ValueError, match="31"):
        w8a8_matmul(torch.randn(2, 31), prepared)
    with pytest.raises(ValueError, match="NaN"):
        w8a8_matmul(torch.tensor([[float("nan")] * 32]), prepared)
    with pytest.raises(ValueError, match="needs input_scale"):
        prepare_w8a8(qw.q, qw.scale, None, qw.spec, ActSpec("int8", dynamic=False))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        prepare_w8a8(qw.q, qw.scale, None, FloatSpec(), ActSpec("fp8"))
    with pytest.raises(ValueError, match="weight_scale"):
        prepare_w8a8(qw.q, torch.ones(3, 1), None, qw.spec, act)
    _, _, scale, static = _prepared(w, "int8-static", torch.randn(4, 32))
    with pytest.raises(ValueError, match="NaN"):
        w8a8_matmul(torch.tensor([[float("nan")] * 32]), static)


def test_backend_choice_on_the_cpu():
    qw, act, input_scale, _ = _prepared(torch.randn(16, 32), "int8-dynamic")
    assert prepare_w8a8(qw.q, qw.scale, input_scale, qw.spec, act).backend == "reference"
    with pytest.raises(ValueError, match=r"w8a8 backend 'torch' is not available on cpu for a \(16, 32\) int8 weight"):
        prepare_w8a8(qw.q, qw.scale, input_scale, qw.spec, act, backend="torch")
    with pytest.raises(ValueError, match="unknown w8a8 backend 'cuda'; available: reference, torch"):
        prepare_w8a8(qw.q, qw.scale, input_scale, qw.spec, act, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("key", SCHEMES)
@pytest.mark.parametrize("m", [1, 16, 40])
def test_torch_tensor_core_backend_matches_the_reference(key, m):
    from quantkit.kernels import backends

    if key.startswith("fp8") and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    g = torch.Generator().manual_seed(m)
    w, x = torch.randn(96, 128, generator=g), torch.randn(m, 128, generator=g)
    qw, act, input_scale, _ = _prepared(w, key, x)
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    # the twin on the same device: a CUDA scale can differ from a CPU one in its last bit
    # (PyTorch divides by a scalar as a multiplication by its reciprocal there), enough
    # to flip single roundings of x
    ref = prepare_w8a8(cuda(qw.q), cuda(qw.scale), cuda(input_scale), qw.spec, act, backend="reference")
    fast = prepare_w8a8(cuda(qw.q), cuda(qw.scale), cuda(input_scale), qw.spec, act, backend="torch")
    assert fast.backend == "torch" and "torch" in backends("w8a8")
    xb = x.cuda().to(torch.bfloat16)
    y_ref = w8a8_matmul(xb, ref).float()
    y = w8a8_matmul(xb, fast).float()
    torch.testing.assert_close(y, y_ref, rtol=1e-2, atol=1e-2)  # bf16 outputs, FP8 sums in another order


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("key", ["int8-dynamic", "fp8-dynamic", "fp8-static-tensor", "int8-static"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 40])
def test_torch_backend_prequantized_matmul_is_its_own_matmul(key, dtype, m):
    """On the tensor cores too, w8a8_matmul_quantized on the input w8a8_matmul quantizes gives its
    bits (float16 outputs included: where torch's row-wise FP8 kernel refuses them, the fallback)."""
    if key.startswith("fp8") and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    g = torch.Generator().manual_seed(m)
    w, x, bias = torch.randn(96, 128, generator=g), torch.randn(m, 128, generator=g), torch.randn(96, generator=g)
    qw, act, input_scale, _ = _prepared(w, key, x)
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    fast = prepare_w8a8(cuda(qw.q), cuda(qw.scale), cuda(input_scale), qw.spec, act, backend="torch")
    xd = x.cuda().to(dtype)
    xq, sx = _quantized_input(xd, act, cuda(input_scale))
    for b in (None, bias.cuda().to(dtype)):
        y = w8a8_matmul_quantized(xq, sx, fast, b, dtype)
        assert y.dtype == dtype and torch.equal(y, w8a8_matmul(xd, fast, b))
    ref = prepare_w8a8(cuda(qw.q), cuda(qw.scale), cuda(input_scale), qw.spec, act, backend="reference")
    torch.testing.assert_close(y.float(), w8a8_matmul_quantized(xq, sx, ref, b, dtype).float(), rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------- recipes

def test_shipped_w8a8_recipes():
    assert load_recipe("w8a8-int8-dynamic").activations == ActSpec("int8", True)
    assert load_recipe("w8a8-fp8-dynamic").weights == FloatSpec("channel")
    static = load_recipe("w8a8-fp8-static")
    assert static.weights == FloatSpec("tensor") and static.activations == ActSpec("fp8", False)
    sq = load_recipe("w8a8-int8-smoothquant")
    assert [s.name for s in sq.algorithms][0] == "smoothquant" and sq.scheme == "W8A8-INT8"


@pytest.mark.parametrize("bad,match", [
    ({"scheme": "W4A16", "activations": {"dynamic": True}}, "keeps activations in 16 bits"),
    ({"scheme": "W8A8-INT8", "activations": {"type": "fp8"}}, "takes int8 activations"),
    ({"scheme": "W8A8-INT8", "weights": {"group_size": 128}}, "per-channel symmetric"),
    ({"scheme": "W8A8-FP8", "weights": {"strategy": "block"}}, "strategy"),
    ({"scheme": "W8A8-FP8", "activations": {"dynamic": "yes"}}, "dynamic"),
    ({"scheme": "W8A8-INT8", "activations": None}, "not null"),
    ({"scheme": "W8A8-INT8", "overrides": [{"pattern": "down", "weights": {"bits": 4}}]}, "overrides"),
    ({"scheme": "W8A8-INT8", "activations": {"observer": "mse"}}, "observer 'mse'.*dynamic: false"),
    ({"scheme": "W8A8-FP8", "activations": {"dynamic": False, "observer": "mse"}}, "observer 'mse'.*int8"),
    ({"scheme": "W8A8-INT8", "activations": {"dynamic": False, "observer": "percentile"}}, "observer"),
])
def test_bad_w8a8_recipes_are_refused(bad, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict({"name": "bad", **bad})


def test_integer_only_algorithms_refuse_fp8_weights():
    from quantkit.algorithms import build_all

    with pytest.raises(RecipeError, match="awq.*integer weights only"):
        build_all(_recipe("fp8-dynamic", algorithms=["awq", "rtn"]))


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_gptq_rounds_fp8_weights_with_error_feedback(strategy):
    """With H = I (uncorrelated inputs) GPTQ has nothing to feed back and equals
    round-to-nearest; with correlated inputs it lowers the output error."""
    from quantkit.algorithms.gptq_math import gptq_quantize

    g = torch.Generator().manual_seed(0)
    spec = FloatSpec(strategy)
    W = torch.randn(32, 64, generator=g)
    rtn = quantize_rtn(W, spec)
    same = gptq_quantize(W, torch.eye(64), spec).weight
    assert same.q.dtype == torch.float8_e4m3fn and torch.equal(same.q.float(), rtn.q.float())
    torch.testing.assert_close(same.scale, rtn.scale)
    X = torch.randn(2048, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(2048, 64, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    qw = gptq_quantize(W, H, spec).weight
    err = lambda q: float((X @ (q.dequantize() - W).T).norm())  # noqa: E731
    assert err(qw) < 0.7 * err(rtn)


# ----------------------------------------------------------------- driver and checkpoints

def test_static_input_scale_is_the_calibration_maximum(tiny_model_dir, tmp_path):
    """The first linears of block 0 see the embeddings through the first norm,
    whatever was quantized: their input_scale is max |x| / 127.5 exactly."""
    from quantkit.calibration import calibration_batch
    from quantkit.models import load_model

    import dataclasses

    recipe = _recipe("int8-static")  # float32 forwards: "auto" takes bf16 on CPUs that multiply it fast
    recipe = dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, dtype="float32"))
    report = api.quantize(tiny_model_dir, recipe, tmp_path / "q", show_progress=False)
    loaded = load_model(tiny_model_dir)
    c = recipe.calibration
    ids = calibration_batch(loaded.tokenizer, c.data, c.num_samples, c.seqlen, c.seed)
    seen = []
    loaded.model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().amax()))
    with torch.inference_mode():
        loaded.model(ids, use_cache=False)
    absmax = max(seen)
    rows = {r["name"]: r for r in report["layers"]}
    row = rows["model.layers.0.self_attn.q_proj"]
    assert row["input_absmax"] == pytest.approx(float(absmax), rel=1e-6)
    assert row["input_scale"] == pytest.approx(float(absmax) / 127.5, rel=1e-6)
    assert all(r["activations"] == "int8 static per-tensor" and r["input_scale"] > 0 for r in rows.values())
    ours = load_checkpoint(tmp_path / "q")
    q = ours.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, W8A8Linear) and float(q.input_scale) == pytest.approx(row["input_scale"], rel=1e-6)


def _true_error(x: torch.Tensor, clip: float) -> float:
    act = ActSpec("int8", False, "mse")
    return float(((fake_quantize_input(x, act, torch.tensor([clip / 127.5])) - x).double() ** 2).sum())


def test_mse_observer_finds_the_range_of_least_squared_error():
    """Heavy-tailed inputs: the histogram's estimate picks a range whose true error (every value
    quantized) is within 2% of the best on a fine grid, and far below the calibration maximum's."""
    from quantkit.algorithms.inputs import InputRanges

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 96, generator=g) / torch.rand(2048, 96, generator=g).clamp_min(1e-5).sqrt()
    ranges = InputRanges(ActSpec("int8", False, "mse"))
    for part in x.split(512):  # batch by batch, as calibration hands them over
        ranges.observe(("a", "b"), part)
    absmax = float(x.abs().max())
    clip = float(ranges.scale("a")) * 127.5
    best = min(_true_error(x, absmax * 2 ** (-k / 64)) for k in range(64 * 12))
    assert clip < 0.6 * absmax
    assert _true_error(x, clip) <= 1.02 * best < 0.6 * _true_error(x, absmax)
    assert ranges.scale("b") == ranges.scale("a")  # one range per input group
    assert ranges.report("a", ranges.scale("a"))["input_clip_ratio"] == pytest.approx(clip / absmax, rel=1e-6)


def test_mse_observer_keeps_outliers_whose_clipping_would_cost_more():
    """A few values far beyond the rest, each of which would lose more to clipping than all the
    others gain from a finer step: the range stays the maximum (minmax's scale)."""
    from quantkit.algorithms.inputs import InputRanges

    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(1))
    x[0, :4] = 2000.0
    mse, minmax = InputRanges(ActSpec("int8", False, "mse")), InputRanges(ActSpec("int8", False))
    mse.observe(("a",), x), minmax.observe(("a",), x)
    assert float(mse.scale("a")) == pytest.approx(float(minmax.scale("a")), rel=1e-6)


@pytest.mark.parametrize("key", SCHEMES)
def test_checkpoint_format_and_transformers_round_trip(tiny_model_dir, tmp_path, key):
    """compressed-tensors validates the config; transformers (+ compressed-tensors)
    computes every quantized linear as our reader does, and the same logits."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    api.quantize(tiny_model_dir, _recipe(key), out, show_progress=False)
    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    cfg = ct.QuantizationConfig.model_validate(raw)
    fp8 = key.startswith("fp8")
    assert cfg.format == ("float-quantized" if fp8 else "int-quantized")
    group = cfg.config_groups["group_0"]
    assert group.input_activations.dynamic == SCHEMES[key][2]["dynamic"]
    assert group.input_activations.observer == (None if SCHEMES[key][2]["dynamic"] else
                                                SCHEMES[key][2].get("observer", "minmax"))
    state = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    assert state[f"{name}.weight"].dtype == (torch.float8_e4m3fn if fp8 else torch.int8)
    assert state[f"{name}.weight_scale"].shape == ((1,) if key.endswith("tensor") else (96, 1))
    assert (f"{name}.input_scale" in state) == (not SCHEMES[key][2]["dynamic"])

    ours = load_checkpoint(out)
    assert sum(isinstance(m, W8A8Linear) for m in ours.model.modules()) == 14
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    seen = {}
    for n, m in ours.model.named_modules():
        if isinstance(m, W8A8Linear):
            theirs.get_submodule(n).register_forward_hook(lambda mod, a, o, n=n: seen.setdefault(n, (a[0], o)) and None)
    with torch.inference_mode():
        a, b = theirs(IDS).logits, ours.model(IDS).logits
        for n, (x, y) in seen.items():  # the same input: the same output
            torch.testing.assert_close(ours.model.get_submodule(n)(x), y, rtol=1e-5, atol=1e-5)
    assert len(seen) == 14
    # end to end: equal up to a rounding flipped by float summation order
    from quantkit.models import load_model

    with torch.inference_mode():
        f = load_model(tiny_model_dir).model(IDS).logits
    assert (a - b).abs().max() < 0.2 * (f - b).abs().max()


def test_w8a8_checkpoint_missing_input_scale_is_a_clear_error(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "q"
    api.quantize(tiny_model_dir, _recipe("fp8-static-tensor"), out, show_progress=False)
    state = load_file(out / "model.safetensors")
    del state["model.layers.0.self_attn.k_proj.input_scale"]
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="k_proj.input_scale"):
        load_checkpoint(out)


def test_smoothquant_then_gptq_on_w8a8(tiny_model_dir, tmp_path):
    recipe = _recipe("int8-dynamic", algorithms=[{"smoothquant": {"alpha": 0.5}}, {"gptq": {"dampening": 0.01}}])
    report = api.quantize(tiny_model_dir, recipe, tmp_path / "q", show_progress=False)
    rows = report["layers"]
    assert all(r["algorithm"] == "gptq" for r in rows)
    assert sum(r.get("smooth_alpha") == 0.5 for r in rows) == len(rows)  # o_proj too: GQA ties its heads' scales
    logits = load_checkpoint(tmp_path / "q").model(IDS).logits
    assert logits.isfinite().all()


def test_cli_quantize_inspect_and_eval_a_static_w8a8_checkpoint(tiny_model_dir, tmp_path):
    """The CLI says how inputs are quantized and what SmoothQuant did; eval counts
    the inputs that saturate at their calibrated static scales."""
    from typer.testing import CliRunner

    from quantkit.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe("int8-static", algorithms=[{"smoothquant": {"alpha": 0.5}}, "rtn"]).to_yaml())
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "--recipe", str(recipe), "--out", str(out)])
    text = result.output + (getattr(result, "stderr", "") or "")
    assert result.exit_code == 0, text
    assert "static per-tensor" in text and "SmoothQuant" in text and "14 of 14 linears smoothed" in text
    result = CliRunner().invoke(app, ["inspect", str(out)])
    flat = " ".join(result.output.split())  # the table wraps long cells
    assert result.exit_code == 0 and "int-quantized" in flat and "static" in flat, result.output
    # a text unlike the calibration data: some inputs exceed the calibrated range
    result = CliRunner().invoke(app, ["eval", str(out), "--data", "pydocs-eval", "--windows", "2", "--seqlen", "64", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["results"][0]
    assert 0.0 <= row["input_saturated_fraction"] < 0.5 and row["perplexity"] > 1


# ----------------------------------------------------------------- CUDA sources

def test_every_cuda_source_compiles_to_ptx(tmp_path):
    """A kernel that does not compile cannot land (runs where nvcc exists): each csrc/*.cu as
    quantkit.kernels.cuda hands it to the compiler (local includes pasted in), for sm_90, or sm_90a
    where the module uses Hopper's architecture-specific instructions."""
    import shutil
    import subprocess
    from pathlib import Path

    from quantkit.kernels import cuda

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    sources = sorted((Path(__file__).resolve().parents[1] / "csrc").glob("*.cu"))
    assert sources
    for src in sources:
        text, out = tmp_path / src.name, tmp_path / f"{src.stem}.ptx"
        text.write_text(cuda.source(src.stem))
        arch = "sm_90a" if src.stem in cuda.ARCH_SPECIFIC else "sm_90"
        r = subprocess.run([nvcc, "--ptx", "-std=c++17", f"-arch={arch}", str(text), "-o", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"{src.name}:\n{r.stderr}"
        assert out.stat().st_size > 0


def _cuda_kernels_available() -> bool:
    from quantkit.kernels import cuda

    return cuda.available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantize_rows_kernel_is_bit_exact_with_torch(dtype, kind):
    if not _cuda_kernels_available():
        pytest.skip("CuPy not installed")
    from quantkit.formats.activation import dynamic_scales, quantize
    from quantkit.kernels.w8a8_torch import quantize_rows_cuda

    act = ActSpec(kind)
    for m, k in [(1, 1), (3, 7), (5, 33), (17, 576), (64, 1536), (2, 4097), (300, 96)]:
        x = torch.randn(m, k, device="cuda", dtype=dtype) * torch.logspace(-3, 2, m, device="cuda", dtype=dtype)[:, None]
        x[0, k // 2] = 0 if k == 1 else x[0, k // 2] * 50  # an outlier (or an all-zero row)
        q, s = quantize_rows_cuda(x, act)
        s_ref = dynamic_scales(x, act)
        q_ref = quantize(x, s_ref, act)
        assert torch.equal(s, s_ref), (m, k)
        assert torch.equal(q.view(torch.int8), q_ref.view(torch.int8)), (m, k)
    strided = torch.randn(8, 256, device="cuda", dtype=dtype)[:, :200]  # rows with a stride > K
    q, s = quantize_rows_cuda(strided, act)
    assert torch.equal(q.view(torch.int8), quantize(strided, dynamic_scales(strided, act), act).view(torch.int8))
    nan = torch.ones(2, 64, device="cuda", dtype=dtype)
    nan[1, 3] = float("nan")
    _, s = quantize_rows_cuda(nan, act)
    assert torch.isfinite(s[0]).all() and torch.isnan(s[1]).all()  # carried into that row's output
    with pytest.raises(ValueError, match="float64"):
        quantize_rows_cuda(torch.ones(2, 8, device="cuda", dtype=torch.float64), act)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_scale_epilogue_kernel_is_bit_exact_with_torch(dtype):
    if not _cuda_kernels_available():
        pytest.skip("CuPy not installed")
    from quantkit.kernels.w8a8_torch import scale_epilogue_cuda

    for m, n in [(1, 8), (17, 96), (5, 4097), (300, 576)]:
        acc = torch.randint(-2**20, 2**20, (m + 3, n), device="cuda", dtype=torch.int32)[:m]  # a row-strided view
        sx = torch.rand(m, 1, device="cuda") * 1e-2
        sw = torch.rand(1, n, device="cuda") * 1e-3
        for bias in (None, torch.randn(n, device="cuda", dtype=dtype)):
            y = scale_epilogue_cuda(acc, sx, sw, bias, dtype)
            ref = acc.to(torch.float32) * sx * sw
            if bias is not None:
                ref = ref + bias.to(torch.float32)
            assert torch.equal(y, ref.to(dtype)), (m, n, bias is None)
    with pytest.raises(ValueError, match="int32"):
        scale_epilogue_cuda(torch.ones(2, 8, device="cuda"), sx[:2], sw[:, :8], None, dtype)


def test_refused_w8a8_recipe_writes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(RecipeError, match="integer weights only"):
        api.quantize(tiny_model_dir, _recipe("fp8-static-tensor", algorithms=["awq", "rtn"]), out, show_progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
