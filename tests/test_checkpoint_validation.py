"""The reader checks a checkpoint against its config.json before building anything.

Each test breaks one thing in a copy of a real checkpoint of the tiny Llama
(config and tensors disagreeing, a tensor missing or extra, a mistyped JSON
field, a foreign layout, an index pointing outside, a NaN) and checks that
loading and inspecting end in one CheckpointError that names the problem;
a representative subset goes through the CLI (exit 1, one `error:` line, no
traceback). Our own AWQ export is read back with the same logits.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit import api
from quantkit.checkpoint import load_checkpoint
from quantkit.errors import CheckpointError
from quantkit.nn import IntWeightLinear
from quantkit.recipe import Recipe
from test_bad_inputs import assert_clean_error, cli

IDS = torch.randint(0, 250, (2, 20), generator=torch.Generator().manual_seed(3))
LINEAR = "model.layers.0.mlp.down_proj"  # [96 out, 160 in]: group 32 gives 5 groups
Q = "model.layers.0.self_attn.q_proj"  # [96, 96], the first linear: named first in an error


def _quantize(src: Path, out: Path, **weights) -> Path:
    recipe = Recipe.from_dict({"name": "t", "weights": {"bits": 4, "group_size": 32, **weights}, "algorithms": ["rtn"]})
    api.quantize(src, recipe, out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def sym_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return _quantize(tiny_model_dir, tmp_path_factory.mktemp("sym") / "ckpt", symmetric=True)


@pytest.fixture(scope="module")
def asym_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return _quantize(tiny_model_dir, tmp_path_factory.mktemp("asym") / "ckpt", symmetric=False)


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, edit) -> None:
    """Apply edit(config dict) to config.json."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2))


def group0(config: dict) -> dict:
    return config["quantization_config"]["config_groups"]["group_0"]


def edit_tensors(folder: Path, edit) -> None:
    """Apply edit(state dict) to model.safetensors."""
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def refused(folder: Path, *fragments: str) -> str:
    """Both load and inspect raise one CheckpointError holding every fragment."""
    with pytest.raises(CheckpointError) as loading:
        api.load(folder)
    for fragment in fragments:
        assert fragment in str(loading.value), str(loading.value)
    with pytest.raises(CheckpointError) as inspecting:
        api.inspect(folder)
    assert str(inspecting.value) == str(loading.value)
    return str(loading.value)


# --------------------------------------------------------------------------- config vs tensors

def _set_group_size(c):
    group0(c)["weights"]["group_size"] = 64


def _set_bits(c):
    group0(c)["weights"]["num_bits"] = 8


def _set_channel(c):
    group0(c)["weights"].update(strategy="channel", group_size=None)


@pytest.mark.parametrize("edit, fragments", [
    (_set_group_size, [f"model.safetensors: {Q}.weight_scale: expected float [96, 2] (group size 64 on 96 inputs: 2 groups), "
                       "found float32 [96, 3]"]),
    (_set_bits, [f"{Q}.weight_packed: expected int32 [96, 24]", "8-bit values", "found int32 [96, 12]"]),
    (_set_channel, [f"{Q}.weight_scale: expected float [96, 1] (one scale per output channel), found float32 [96, 3]"]),
    (lambda c: group0(c)["weights"].update(symmetric=False), [f"{Q}.weight_zero_point: missing", "asymmetric"]),
    (lambda c: c.update(intermediate_size=128), ["model.layers.0.mlp.gate_proj.weight_packed: expected int32 [128, 12]",
                                                 "found int32 [160, 12]"]),
    (lambda c: c.update(vocab_size=320), ["model.embed_tokens.weight: expected float [320, 96]", "found float32 [300, 96]"]),
], ids=["group-size", "bits", "strategy", "symmetric", "linear-shape", "vocab-size"])
def test_config_disagreeing_with_tensors(sym_dir, tmp_path, edit, fragments):
    folder = copy(sym_dir, tmp_path)
    edit_config(folder, edit)
    message = refused(folder, "do not match config.json", *fragments)
    assert "Traceback" not in message


def test_zero_points_of_a_checkpoint_the_config_calls_symmetric(asym_dir, tmp_path):
    folder = copy(asym_dir, tmp_path)
    edit_config(folder, lambda c: group0(c)["weights"].update(symmetric=True))
    refused(folder, f"{LINEAR}.weight_zero_point: unexpected tensor (config.json says symmetric: no zero points)")


def test_many_problems_are_counted(sym_dir, tmp_path):
    folder = copy(sym_dir, tmp_path)
    edit_config(folder, _set_bits)  # every one of the 14 weight_packed tensors is wrong
    assert refused(folder).endswith("; and 9 more")


@pytest.mark.parametrize("key", [f"{LINEAR}.weight_scale", f"{LINEAR}.weight_shape", f"{LINEAR}.weight_packed",
                                 "model.layers.1.post_attention_layernorm.weight", "model.norm.weight"])
def test_missing_tensor(sym_dir, tmp_path, key):
    folder = copy(sym_dir, tmp_path)
    edit_tensors(folder, lambda s: s.pop(key))
    refused(folder, f"{key}: missing (expected")


def test_unexpected_tensor(sym_dir, tmp_path):
    folder = copy(sym_dir, tmp_path)
    edit_tensors(folder, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(3)}))
    refused(folder, "model.safetensors: model.layers.0.mlp.extra.weight: unexpected tensor")


def test_float_weight_of_a_quantized_linear_is_unexpected(sym_dir, tmp_path):
    folder = copy(sym_dir, tmp_path)
    edit_tensors(folder, lambda s: s.update({f"{LINEAR}.weight": torch.zeros(96, 160)}))
    refused(folder, f"{LINEAR}.weight: unexpected tensor (not part of quantized {LINEAR}'s layout)")


def test_weight_shape_values_must_match(sym_dir, tmp_path):
    folder = copy(sym_dir, tmp_path)
    edit_tensors(folder, lambda s: s.update({f"{LINEAR}.weight_shape": torch.tensor([160, 96])}))
    with pytest.raises(CheckpointError, match=rf"{LINEAR}.weight_shape holds \[160, 96\], the model config says \[96, 160\]"):
        api.load(folder)


def test_nan_in_a_norm(sym_dir, tmp_path):
    folder = copy(sym_dir, tmp_path)
    edit_tensors(folder, lambda s: s["model.layers.1.input_layernorm.weight"].__setitem__(7, float("nan")))
    with pytest.raises(CheckpointError, match="model.layers.1.input_layernorm.weight holds NaN or Inf"):
        api.load(folder)


# --------------------------------------------------------------------------- JSON types

@pytest.mark.parametrize("edit, fragment", [
    (lambda c: group0(c)["weights"].update(num_bits="4"),
     'quantization_config.config_groups.group_0.weights.num_bits: expected an integer, got "4"'),
    (lambda c: c["quantization_config"].update(config_groups=[group0(c)]),
     "quantization_config.config_groups: expected an object, got [{"),
    (lambda c: c["quantization_config"].update(ignore=["lm_head", 3]), "quantization_config.ignore[1]: expected a string, got 3"),
    (lambda c: c.update(quantization_config="compressed-tensors"), 'quantization_config: expected an object, got "compressed-tensors"'),
    (lambda c: group0(c).update(targets="Linear"), 'group_0.targets: expected a list, got "Linear"'),
    (lambda c: group0(c)["weights"].update(symmetric="yes"), 'weights.symmetric: expected true or false, got "yes"'),
    (lambda c: group0(c)["weights"].update(scale_dtype=16), "weights.scale_dtype: expected a string, got 16"),
    (lambda c: group0(c)["weights"].update(scale_dtype="torch.float8_e4m3fn"),
     'weights.scale_dtype: scales stored as "torch.float8_e4m3fn" are not supported (float16, bfloat16, float32)'),
    (lambda c: c.update(hidden_size="96"), 'hidden_size: expected an integer, got "96"'),
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads: expected a positive integer, got 0"),
    (lambda c: c.update(hidden_act="swiglu"), "hidden_act: unknown activation 'swiglu'"),
    (lambda c: c.update(rms_norm_eps=-1e-6), "rms_norm_eps: expected a positive number, got -1e-06"),
    (lambda c: c.update(tie_word_embeddings="true"), 'tie_word_embeddings: expected true or false, got "true"'),
    (lambda c: c.update(pad_token_id=300), "pad_token_id: 300 is outside the vocabulary of 300 tokens"),
    (lambda c: c.pop("vocab_size"), "vocab_size: missing (expected an integer)"),
    (lambda c: c.update(num_hidden_layers=10**9), "num_hidden_layers is 1000000000, but the weight files hold tensors of 2 blocks"),
], ids=["num-bits-string", "groups-list", "ignore-number", "qconfig-string", "targets-string", "symmetric-string",
        "scale-dtype-number", "scale-dtype-fp8",
        "hidden-size-string", "zero-heads", "activation", "eps", "tie-string", "pad-id", "no-vocab", "huge-layer-count"])
def test_mistyped_config_fields(sym_dir, tmp_path, edit, fragment):
    folder = copy(sym_dir, tmp_path)
    edit_config(folder, edit)
    message = refused(folder, fragment)
    assert message.startswith(str(folder.resolve() / "config.json"))


def test_config_json_that_is_a_list(sym_dir, tmp_path):
    folder = copy(sym_dir, tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    refused(folder, "config.json: expected a JSON object, got list [1, 2]")


def test_config_json_without_quantization_config_but_quantized_weights(sym_dir, tmp_path):
    folder = copy(sym_dir, tmp_path)
    edit_config(folder, lambda c: c.pop("quantization_config"))
    refused(folder, "config.json has no quantization_config, but its weights are quantized")


# --------------------------------------------------------------------------- foreign layouts

def _gptq_folder(tiny_model_dir: Path, folder: Path, labelled: bool) -> Path:
    """A small fake AutoGPTQ folder: qweight/qzeros/scales/g_idx per linear + quantize_config.json."""
    shutil.copytree(tiny_model_dir, folder)
    gptq = {"bits": 4, "group_size": 32, "desc_act": False, "sym": True, "quant_method": "gptq"}
    config = json.loads((folder / "config.json").read_text())
    if labelled:
        config["quantization_config"] = gptq
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "quantize_config.json").write_text(json.dumps(gptq))
    state = load_file(folder / "model.safetensors")
    for key in [k for k in state if k.endswith("proj.weight")]:
        out, inp = state.pop(key).shape
        name = key.removesuffix(".weight")
        state.update({f"{name}.qweight": torch.zeros(inp // 8, out, dtype=torch.int32),
                      f"{name}.qzeros": torch.zeros(inp // 32, out // 8, dtype=torch.int32),
                      f"{name}.scales": torch.ones(inp // 32, out, dtype=torch.float16),
                      f"{name}.g_idx": torch.arange(inp, dtype=torch.int32) // 32})
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("labelled", [True, False], ids=["quant-method-gptq", "quantize-config-only"])
def test_gptq_checkpoint_is_named(tiny_model_dir, tmp_path, labelled):
    folder = _gptq_folder(tiny_model_dir, tmp_path / "gptq", labelled)
    refused(folder, "a GPTQ checkpoint (qweight/qzeros/scales/g_idx), which quantkit does not read", "w4a16-gptq")
    assert_clean_error(*cli("eval", folder, "--seqlen", 32, "--windows", 1), "GPTQ checkpoint")
    assert_clean_error(*cli("inspect", folder), "GPTQ checkpoint")


@pytest.mark.parametrize("qconfig, fragment", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "a bitsandbytes checkpoint"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "fine-grained FP8 checkpoint"),
    ({"quant_method": "EXL2", "bits": 4.5}, "ExLlamaV2 (EXL2) checkpoint"),
    ({"quant_method": "hqq"}, "an HQQ checkpoint"),
    ({"quant_method": "awq", "version": "gemv", "bits": 4, "group_size": 32, "zero_point": True},
     'an AWQ checkpoint of version "gemv"'),
    ({"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": False}, "zero_point false"),
    ({"quant_method": "no-such-method"}, 'quant_method "no-such-method"'),
], ids=["bitsandbytes", "fp8", "exl2", "hqq", "awq-gemv", "awq-no-zero-point", "unknown"])
def test_foreign_quant_methods_are_named(sym_dir, tmp_path, qconfig, fragment):
    folder = copy(sym_dir, tmp_path)
    edit_config(folder, lambda c: c.update(quantization_config=qconfig))
    message = refused(folder, fragment)
    assert "which quantkit does not read" in message


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c["quantization_config"].update(format="nvfp4-pack-quantized"), "'nvfp4-pack-quantized'"),
    (lambda c: c["quantization_config"].update(kv_cache_scheme={"num_bits": 8}), "quantizes the KV cache"),
    (lambda c: c["quantization_config"].update(sparsity_config={"format": "sparse-24-bitmask"}), "a sparse checkpoint"),
], ids=["nvfp4", "kv-cache", "sparse"])
def test_compressed_tensors_variants_we_do_not_read(sym_dir, tmp_path, edit, fragment):
    folder = copy(sym_dir, tmp_path)
    edit_config(folder, edit)
    refused(folder, fragment)


# --------------------------------------------------------------------------- our AWQ export, read back

@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_awq_export_reads_back_to_the_same_logits(tiny_model_dir, tmp_path, symmetric):
    """Exactly equal logits in float32, against the source checkpoint with its float tensors rounded
    to float16: the export keeps q and z exactly (only their storage changes: unsigned, interleaved,
    transposed) and rounds the scales, norms and embeddings to float16, nothing else."""
    src = _quantize(tiny_model_dir, tmp_path / "ct", symmetric=symmetric)
    api.export(src, tmp_path / "awq", "awq")
    awq = api.load(tmp_path / "awq")
    down = awq.model.get_submodule(LINEAR)
    assert isinstance(down, IntWeightLinear) and down.spec.bits == 4 and not down.spec.symmetric
    assert down.spec.group_size == 32 and down.weight_scale.dtype == torch.float16
    assert type(awq.model.lm_head) is torch.nn.Linear  # modules_to_not_convert stays float
    ref = load_checkpoint(src).model
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    for m in ref.modules():
        if isinstance(m, IntWeightLinear):
            m.prepare()  # the kernel layout of the rounded scales
    with torch.inference_mode():
        a, b = ref(IDS).logits, awq.model.float()(IDS).logits
        c = load_checkpoint(src).model(IDS).logits
    assert torch.equal(a, b)
    assert 0 < (b - c).abs().max() < 1e-2  # what float16 storage costs against the float32 source


def test_awq_checkpoint_validated_like_ours(tiny_model_dir, tmp_path):
    src = _quantize(tiny_model_dir, tmp_path / "ct", symmetric=False)
    folder = api.export(src, tmp_path / "awq", "awq")
    edit_config(folder, lambda c: c["quantization_config"].update(group_size=96))  # 160 inputs: not whole groups
    refused(folder, f"{LINEAR}: AWQ GEMM needs whole groups, 160 inputs are not a multiple of group size 96")
    edit_config(folder, lambda c: c["quantization_config"].update(group_size=16))
    refused(folder, f"{Q}.scales: expected float [6, 96] (group size 16 on 96 inputs: 6 groups)", "found float16 [3, 96]")


# --------------------------------------------------------------------------- weight files

def _shard(folder: Path, target: str) -> None:
    """Replace model.safetensors by an index whose one entry is `target`."""
    keys = list(load_file(folder / "model.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: target for k in keys}}))


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors"])
def test_index_must_name_files_inside_the_folder(sym_dir, tmp_path, target):
    folder = copy(sym_dir, tmp_path)
    _shard(folder, target)
    refused(folder, "a weight file must be a plain file name inside")


def test_index_symlink_leading_outside(sym_dir, tmp_path):
    folder = copy(sym_dir, tmp_path)
    _shard(folder, "shard.safetensors")
    (folder / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", folder / "shard.safetensors")
    refused(folder, "shard.safetensors link(s) outside the folder")


def test_hugging_face_cache_snapshot_with_symlinked_blobs_loads(sym_dir, tmp_path):
    """In the hub cache every file of snapshots/<rev>/ links to ../../blobs/<hash>: that is not outside."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in sym_dir.iterdir() if p.is_file())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        os.symlink(Path("..") / ".." / "blobs" / f"blob{i}", snapshot / f.name)
    loaded = api.load(snapshot)
    assert isinstance(loaded.model.get_submodule(LINEAR), IntWeightLinear)


# --------------------------------------------------------------------------- through the CLI

def test_eval_of_a_mismatched_checkpoint_is_one_clean_error(sym_dir, tmp_path):
    folder = copy(sym_dir, tmp_path)
    edit_config(folder, _set_group_size)
    assert_clean_error(*cli("eval", folder, "--seqlen", 32, "--windows", 1), f"{Q}.weight_scale", "group size 64")


def test_eval_of_a_mistyped_config_is_one_clean_error(sym_dir, tmp_path):
    folder = copy(sym_dir, tmp_path)
    edit_config(folder, lambda c: group0(c)["weights"].update(num_bits="4"))
    assert_clean_error(*cli("eval", folder, "--seqlen", 32, "--windows", 1), "num_bits: expected an integer")


def test_inspect_of_a_truncated_data_section(sym_dir, tmp_path):
    folder = copy(sym_dir, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    (folder / "model.safetensors").write_bytes(data[: header_end + (len(data) - header_end) // 2])  # header intact
    assert_clean_error(*cli("inspect", folder), "corrupted safetensors file", "model.safetensors")


def test_inspect_of_a_header_config_mismatch(sym_dir, tmp_path):
    folder = copy(sym_dir, tmp_path)
    edit_tensors(folder, lambda s: s.pop("model.norm.weight"))
    assert_clean_error(*cli("inspect", folder), "model.norm.weight: missing")


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"], ids=["not-json", "list", "not-utf8"])
def test_inspect_of_an_unreadable_report(sym_dir, tmp_path, content):
    folder = copy(sym_dir, tmp_path)
    (folder / "quantization_report.json").write_bytes(content)
    assert_clean_error(*cli("inspect", folder), "quantization_report.json")


def test_inspect_normalizes_mistyped_report_fields(sym_dir, tmp_path):
    folder = copy(sym_dir, tmp_path)
    report = json.loads((folder / "quantization_report.json").read_text())
    report.update(bytes_float="many", bytes_on_disk=None)
    report["layers"][0]["weight_rel_error"] = "small"
    report["layers"][1] = 7
    (folder / "quantization_report.json").write_text(json.dumps(report))
    info = api.inspect(folder)
    assert info["report"]["bytes_float"] == 0 and info["report"]["bytes_on_disk"] == 0
    assert len(info["report"]["layers"]) == 12
    assert info["report_problems"][0] == 'bytes_float: expected a number, got "many"; shown as 0'
    result, text = cli("inspect", folder)
    assert result.exit_code == 0, text


def test_float_folder_still_loads_as_a_float_model(tiny_model_dir):
    loaded = api.load(tiny_model_dir)
    assert type(loaded.model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        api.inspect(tiny_model_dir)


# --------------------------------------------------------------------------- W8A8

def test_w8a8_config_disagreeing_with_tensors(tiny_model_dir, tmp_path):
    src = tmp_path / "fp8"
    api.quantize(tiny_model_dir, "w8a8-fp8-dynamic", src, num_samples=4, seqlen=32, show_progress=False)
    folder = copy(src, tmp_path)
    edit_config(folder, lambda c: group0(c)["weights"].update(strategy="tensor"))
    refused(folder, f"{Q}.weight_scale: expected float [1] (one scale per tensor), found float32 [96, 1]")
    folder = copy(src, tmp_path / "static")
    edit_config(folder, lambda c: group0(c)["input_activations"].update(dynamic=False, strategy="tensor"))
    refused(folder, f"{Q}.input_scale: missing (expected float [1] (static input activations: one input scale))")
    folder = copy(src, tmp_path / "int8")
    edit_config(folder, lambda c: group0(c).update(format="int-quantized", weights=dict(group0(c)["weights"], type="int"),
                                                   input_activations=dict(group0(c)["input_activations"], type="int")))
    refused(folder, f"{Q}.weight: expected int8 [96, 96] (int-quantized weight), found float8_e4m3fn [96, 96]")
