"""W4A8-INT8: 4-bit symmetric weights in groups with int8 per-token inputs, written as
compressed-tensors' int-quantized (one int8 per value, [out, groups] scales), read back by
our reader (W8A8Linear, reference kernel) and by transformers + compressed-tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit import api
from quantkit.checkpoint import load_checkpoint
from quantkit.errors import CheckpointError
from quantkit.formats import ActSpec, IntSpec, quantize_rtn
from quantkit.formats.activation import fake_quantize as fake_quantize_input
from quantkit.kernels import prepare_w8a8, w8a8_matmul
from quantkit.models import load_model
from quantkit.nn import W8A8Linear
from quantkit.recipe import Recipe, RecipeError, load_recipe

IDS = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))
DOWN = "model.layers.1.mlp.down_proj"  # [96 out, 160 in]: group 32 gives 5 groups


def _recipe(weights: dict | None = None, acts: dict | None = None, algorithms=("rtn",), **extra) -> Recipe:
    return Recipe.from_dict({"name": "w4a8", "scheme": "W4A8-INT8", "weights": {"group_size": 32, **(weights or {})},
                             "activations": {"dynamic": True, **(acts or {})}, "algorithms": list(algorithms),
                             "calibration": {"num_samples": 8, "seqlen": 32, "dtype": "model"}, **extra})


def _quantize(src: Path, recipe: Recipe, out: Path, small_text: Path) -> Path:
    api.quantize(src, recipe, out, calib_data=str(small_text), show_progress=False)
    return out


@pytest.fixture(scope="module")
def w4a8_dir(tiny_model_dir, small_text, tmp_path_factory) -> Path:
    return _quantize(tiny_model_dir, _recipe(), tmp_path_factory.mktemp("w4a8") / "q", small_text)


# ----------------------------------------------------------------- recipes

def test_shipped_w4a8_recipes():
    recipe = load_recipe("w4a8-int8")
    assert recipe.scheme == "W4A8-INT8" and recipe.weights == IntSpec(4, True, 128)
    assert recipe.activations == ActSpec("int8", dynamic=True)
    assert [s.name for s in recipe.algorithms] == ["gptq"]
    rotated = load_recipe("ablations/w4a8-int8-rotate")
    assert [s.name for s in rotated.algorithms] == ["rotate", "gptq"] and rotated.algorithms[0].kwargs()["online"]


@pytest.mark.parametrize("bad,match", [
    ({"weights": {"symmetric": False}}, "takes symmetric weights"),
    ({"weights": {"bits": 8}}, "contradicts scheme 'W4A8-INT8'"),
    ({"activations": {"type": "fp8"}}, "takes int8 activations"),
    ({"activations": None}, "not null"),
    ({"overrides": [{"pattern": "down", "weights": {"group_size": 64}}]}, "overrides"),
    ({"scheme": "W8A8-INT8", "weights": {"group_size": 128}}, "per-channel symmetric.*use scheme W4A8-INT8"),
])
def test_bad_w4a8_recipes_are_refused(bad, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict({"name": "bad", "scheme": "W4A8-INT8", **bad})


def test_gptq_act_order_group_is_refused_weight_order_is_not():
    """int-quantized stores no g_idx: GPTQ's actorder group would lose each column's group."""
    from quantkit.algorithms import build_all

    with pytest.raises(RecipeError, match="actorder: group.*int-quantized.*use actorder: weight"):
        build_all(_recipe(algorithms=[{"gptq": {"actorder": "group"}}]))
    build_all(_recipe(algorithms=[{"gptq": {"actorder": "weight"}}]))
    build_all(Recipe.from_dict({"name": "w8a8", "scheme": "W8A8-INT8", "algorithms": [{"gptq": {"actorder": "group"}}]}))


# ----------------------------------------------------------------- the kernel entry point

@pytest.mark.parametrize("k,group_size", [(64, 32), (80, 32), (96, 128), (64, None)],
                         ids=["whole-groups", "partial-last-group", "one-wide-group", "per-channel"])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_reference_kernel_is_quantized_input_times_dequantized_weight(k, group_size, m):
    g = torch.Generator().manual_seed(m + k)
    w, x, bias = torch.randn(48, k, generator=g), torch.randn(3, m, k, generator=g), torch.randn(48, generator=g)
    x[..., 7] *= 30  # an outlier channel
    spec, act = IntSpec(4, True, group_size), ActSpec("int8")
    qw = quantize_rtn(w, spec)
    assert qw.q.min() >= -8 and qw.q.max() <= 7
    prepared = prepare_w8a8(qw.q, qw.scale, None, spec, act)
    y = w8a8_matmul(x, prepared, bias)
    torch.testing.assert_close(y, fake_quantize_input(x, act) @ qw.dequantize().T + bias, rtol=1e-5, atol=1e-4)


def test_kernel_refuses_a_scale_of_the_wrong_shape_and_names_groups():
    spec, act = IntSpec(4, True, 32), ActSpec("int8")
    qw = quantize_rtn(torch.randn(16, 80), spec)
    with pytest.raises(ValueError, match=r"weight_scale has shape \(16, 2\), expected \(16, 3\) \(group size 32 on 80 inputs\)"):
        prepare_w8a8(qw.q, qw.scale[:, :2], None, spec, act)
    assert prepare_w8a8(qw.q, qw.scale, None, spec, act).backend == "reference"
    with pytest.raises(ValueError, match=r"'torch' is not available on cpu for a \(16, 80\) int8 weight in groups of 32"):
        prepare_w8a8(qw.q, qw.scale, None, spec, act, backend="torch")


def test_the_tensor_core_backend_takes_no_groups_and_the_registry_falls_back():
    """_int_mm has one scale per output row: on a GPU, grouped weights get the reference."""
    from quantkit.kernels import backend
    from quantkit.kernels.registry import select_backend

    spec, act = IntSpec(4, True, 32), ActSpec("int8")
    qw = quantize_rtn(torch.randn(64, 128), spec)
    grouped = prepare_w8a8(qw.q, qw.scale, None, spec, act, backend="reference")
    assert not backend("w8a8", "torch").available(torch.device("cuda"), None, grouped)
    assert select_backend("w8a8", "cuda", spec=grouped).name == "reference"


# ----------------------------------------------------------------- checkpoints

def test_checkpoint_tensors_and_config(w4a8_dir):
    """compressed-tensors' preset W4A8 (group 32 here), written int-quantized: the format its own
    inference picks for int weights with quantized inputs."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import W4A8

    raw = json.loads((w4a8_dir / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.model_validate(raw)
    assert cfg.format == "int-quantized" and list(cfg.config_groups) == ["group_0"]
    group = cfg.config_groups["group_0"]
    preset = {"weights": W4A8["weights"].model_copy(update={"group_size": 32}), "input_activations": W4A8["input_activations"]}
    for key, args in preset.items():
        ours = getattr(group, key).model_dump(exclude={"observer"})
        assert ours == args.model_dump(exclude={"observer"}), key
    assert infer_module_format(torch.nn.Linear, QuantizationScheme(targets=["Linear"], **W4A8)) == CompressionFormat.int_quantized

    state = load_file(w4a8_dir / "model.safetensors")
    assert sorted(k for k in state if k.startswith(f"{DOWN}.")) == [f"{DOWN}.weight", f"{DOWN}.weight_scale"]
    q, s = state[f"{DOWN}.weight"], state[f"{DOWN}.weight_scale"]
    assert q.dtype == torch.int8 and q.shape == (96, 160) and -8 <= int(q.min()) and int(q.max()) <= 7
    assert s.dtype == torch.float32 and s.shape == (96, 5)
    report = json.loads((w4a8_dir / "quantization_report.json").read_text())
    row = next(r for r in report["layers"] if r["name"] == DOWN)
    assert row["bits"] == 4 and row["group_size"] == 32
    assert row["bytes_quantized"] == 96 * 160 + 96 * 5 * 4  # one byte per value: int-quantized does not pack


def _fake_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    s = (x.abs().amax(dim=-1, keepdim=True) / 127.5).clamp_min(torch.finfo(torch.float32).eps)
    return torch.round(x / s).clamp(-128, 127) * s


def _twin(tiny_model_dir: Path, folder: Path) -> torch.nn.Module:
    """The float model with each quantized linear's weight replaced by q * s (each group's
    scale, from the checkpoint's tensors) and its input fake-quantized per token: W4A8's math."""
    state = load_file(folder / "model.safetensors")
    model = load_model(tiny_model_dir).model
    for name, module in model.named_modules():
        if f"{name}.weight_scale" in state:
            q, s = state[f"{name}.weight"].float(), state[f"{name}.weight_scale"]
            (n, k), groups = q.shape, s.shape[1]
            assert k % groups == 0
            module.weight.data = (q.reshape(n, groups, k // groups) * s[..., None]).reshape(n, k)
            module.register_forward_pre_hook(lambda m, a: (_fake_int8_per_token(a[0]),))
    return model.eval()


def _same_per_linear(ours: torch.nn.Module, theirs: torch.nn.Module) -> torch.Tensor:
    """theirs' logits, each of ours' quantized linears checked against theirs on the input
    theirs' saw (the same input: the same output, whatever roundings flipped upstream)."""
    inputs, outputs = {}, {}
    for n, m in ours.named_modules():
        if isinstance(m, W8A8Linear):
            # the input before any pre-hook of theirs (the twin's input quantizer) changes it
            theirs.get_submodule(n).register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, (a[0],)) and None,
                                                              prepend=True)
            theirs.get_submodule(n).register_forward_hook(lambda mod, a, o, n=n: outputs.setdefault(n, (o,)) and None)
    with torch.inference_mode():
        logits = theirs(IDS).logits
        for n, (x,) in inputs.items():
            torch.testing.assert_close(ours.get_submodule(n)(x), outputs[n][0], rtol=1e-5, atol=1e-5)
    assert len(inputs) == len(outputs) == 14
    return logits


def test_our_reader_computes_the_twin(tiny_model_dir, w4a8_dir):
    ours = load_checkpoint(w4a8_dir).model
    down = ours.get_submodule(DOWN)
    assert isinstance(down, W8A8Linear) and down.spec == IntSpec(4, True, 32) and down.weight_scale.shape == (96, 5)
    assert "int4 group 32" in repr(down)
    a = _same_per_linear(ours, _twin(tiny_model_dir, w4a8_dir))
    with torch.inference_mode():
        b = ours(IDS).logits
        f = load_model(tiny_model_dir).model(IDS).logits
    # end to end: equal up to an input rounding flipped by float summation order
    assert (a - b).abs().max() < 0.05 * (f - b).abs().max()


@pytest.mark.parametrize("weights,dynamic", [({}, True), ({}, False), ({"group_size": None}, True)],
                         ids=["dynamic", "static", "per-channel"])
def test_transformers_round_trip(tiny_model_dir, small_text, tmp_path, w4a8_dir, weights, dynamic):
    """transformers + compressed-tensors decompress each weight to q * s and fake-quantize its
    input: every quantized linear computes what ours does, and the logits agree closely."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    recipe = _recipe(weights, acts={"dynamic": dynamic})
    out = w4a8_dir if recipe == _recipe() else _quantize(tiny_model_dir, recipe, tmp_path / "q", small_text)
    state = load_file(out / "model.safetensors")
    assert (f"{DOWN}.input_scale" in state) == (not dynamic)
    assert state[f"{DOWN}.weight_scale"].shape == ((96, 1) if "group_size" in weights else (96, 5))
    ours = load_checkpoint(out).model
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    a = _same_per_linear(ours, theirs)
    with torch.inference_mode():
        b = ours(IDS).logits
        f = load_model(tiny_model_dir).model(IDS).logits
    assert (a - b).abs().max() < 0.05 * (f - b).abs().max()


def test_partial_groups_keep_and_shrink(tiny_model_dir, small_text, tmp_path):
    """Group 128 on 96- and 160-wide inputs: shrink halves it to 32 everywhere (as pack-quantized
    does); keep writes a partial last group, which our reader computes as the kernel twin."""
    shrink = _quantize(tiny_model_dir, _recipe({"group_size": 128}), tmp_path / "shrink", small_text)
    raw = json.loads((shrink / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["group_size"] for g in raw["config_groups"].values()] == [32]
    keep = _quantize(tiny_model_dir, _recipe({"group_size": 128}, partial_groups="keep"), tmp_path / "keep", small_text)
    state = load_file(keep / "model.safetensors")
    assert state[f"{DOWN}.weight_scale"].shape == (96, 2)  # 128 + 32 inputs
    assert state["model.layers.1.mlp.gate_proj.weight_scale"].shape == (160, 1)  # 96 inputs: one partial group
    down = load_checkpoint(keep).model.get_submodule(DOWN)
    x = torch.randn(5, 160, generator=torch.Generator().manual_seed(0))
    q, s = state[f"{DOWN}.weight"].float(), state[f"{DOWN}.weight_scale"]
    w = q * torch.cat([s[:, :1].expand(96, 128), s[:, 1:].expand(96, 32)], dim=1)
    with torch.inference_mode():
        torch.testing.assert_close(down(x), _fake_int8_per_token(x) @ w.T, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- bad checkpoints

def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_group(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"]["config_groups"]["group_0"])
    path.write_text(json.dumps(config, indent=2))


def test_a_value_beyond_four_bits_is_a_clear_error(w4a8_dir, tmp_path):
    folder = _copy(w4a8_dir, tmp_path)
    _edit_tensors(folder, lambda s: s[f"{DOWN}.weight"].__setitem__((3, 7), 9))
    with pytest.raises(CheckpointError, match=rf"{DOWN}.weight holds values -8..9; its 4-bit weights lie in -8..7"):
        api.load(folder)


def test_a_scale_of_the_wrong_shape_is_a_clear_error(w4a8_dir, tmp_path):
    folder = _copy(w4a8_dir, tmp_path)
    _edit_tensors(folder, lambda s: s.update({f"{DOWN}.weight_scale": s[f"{DOWN}.weight_scale"][:, :4].contiguous()}))
    message = (rf"{DOWN}.weight_scale: expected float \[96, 5\] \(group size 32 on 160 inputs: 5 groups\), "
               rf"found float32 \[96, 4\]")
    for call in (api.load, api.inspect):
        with pytest.raises(CheckpointError, match=message):
            call(folder)


@pytest.mark.parametrize("edit,match", [
    (lambda g: g["weights"].update(symmetric=False), "asymmetric integer weights with int8 input activations"),
    (lambda g: g["weights"].update(group_size=64), r"weight_scale: expected float \[96, 2\] \(group size 64 on 96 inputs"),
    (lambda g: g["weights"].update(num_bits=2), r"holds values -\d..\d; its 2-bit weights lie in -2..1"),
], ids=["asymmetric", "group-size", "bits"])
def test_a_config_disagreeing_with_the_tensors_is_a_clear_error(w4a8_dir, tmp_path, edit, match):
    folder = _copy(w4a8_dir, tmp_path)
    _edit_group(folder, edit)
    with pytest.raises(CheckpointError, match=match):
        api.load(folder)
