"""Write a quantized model as a compressed-tensors checkpoint.

    DIR/
      config.json                  with quantization_config (compressed-tensors)
      model.safetensors            (or model-0000i-of-0000n.safetensors + index)
      tokenizer files, generation_config.json
      quantkit_recipe.yaml         the recipe that made it
      quantization_report.json     per-layer errors, timings, sizes

Per quantized linear X the state dict holds, in place of the float X.weight:
  pack-quantized (weight-only): X.weight_packed (int32, packed along the input
    dim), X.weight_scale, X.weight_shape and, when asymmetric,
    X.weight_zero_point (int32, packed along the output dim);
  int-quantized / float-quantized (W8A8, W4A8): X.weight (int8 / float8_e4m3fn,
    one value per byte unpacked: W4A8's in [-8, 7]), X.weight_scale ([out, 1] per
    channel, [out, groups] in groups, [1] per tensor) and, for static
    activations, X.input_scale ([1]).

Tensor and layer names are the ones transformers' save_pretrained writes: a
mixture of experts' linears per expert (mlp.experts.E.gate_proj, Mixtral's
block_sparse_moe.experts.E.w1), through the family's renames.

Everything is written into a hidden temporary folder beside DIR and renamed at
the end, with a manifest of the files (quantkit/checkpoint/output.py): a failed
or interrupted run leaves no half-written DIR behind, and force replaces only
what quantkit wrote.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantkit.checkpoint.config import build_quantization_config
from quantkit.checkpoint.output import atomic_output, check_output  # noqa: F401  (re-exported)
from quantkit.errors import NumericalError
from quantkit.formats.finite import all_finite
from quantkit.formats import ActSpec, QuantizedWeight, pack_int32, per_tensor
from quantkit.models.families import checkpoint_name, family_for

RECIPE_FILE = "quantkit_recipe.yaml"
REPORT_FILE = "quantization_report.json"
MAX_SHARD_BYTES = 4 * 1024**3


def packed_tensors(name: str, qw: QuantizedWeight, activations: ActSpec | None = None,
                   input_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The on-disk tensors of one quantized linear (W8A8 / W4A8 when `activations` is given)."""
    spec = qw.spec
    if activations is not None:
        if qw.g_idx is not None and spec.group_size is not None:  # GPTQ.check refuses actorder group here
            raise ValueError(f"{name}: int-quantized has no tensor for an act-order g_idx")
        out = {f"{name}.weight": qw.q.contiguous(),
               f"{name}.weight_scale": qw.scale.reshape(1) if per_tensor(spec) else qw.scale.contiguous()}
        if not activations.dynamic:
            if input_scale is None:
                raise ValueError(f"{name}: static activations need a calibrated input_scale")
            out[f"{name}.input_scale"] = input_scale.reshape(1).to(qw.scale.dtype)
        return out
    out = {
        f"{name}.weight_packed": pack_int32(qw.q, spec.bits, dim=1),
        f"{name}.weight_scale": qw.scale.contiguous(),
        f"{name}.weight_shape": torch.tensor(list(qw.q.shape), dtype=torch.int64),
    }
    if not spec.symmetric:
        out[f"{name}.weight_zero_point"] = pack_int32(qw.zero_point, spec.bits, dim=0)
    if qw.g_idx is not None:
        out[f"{name}.weight_g_idx"] = qw.g_idx.to(torch.int32)
    return out


def quantized_state_dict(model: torch.nn.Module, weights: dict[str, QuantizedWeight], activations: ActSpec | None = None,
                         input_scales: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    skip = {f"{name}.weight" for name in weights}
    if getattr(model.config, "tie_word_embeddings", False):
        # tied to the input embedding: written once, re-tied by transformers at load
        out_emb = model.get_output_embeddings()
        skip |= {f"{n}.weight" for n, m in model.named_modules() if m is out_emb}
    state = {k: t.detach().contiguous() for k, t in model.state_dict().items() if k not in skip}
    for name, qw in weights.items():
        state.update(packed_tensors(name, qw, activations, (input_scales or {}).get(name)))
    return state


def check_finite_state(state: dict[str, torch.Tensor]) -> None:
    """NumericalError naming the first float tensor holding NaN or Inf: embeddings,
    norms and biases too, not only the quantized linears' scales."""
    for key, t in state.items():
        if not all_finite(t):
            raise NumericalError(f"{key} contains NaN or Inf; refusing to write the checkpoint")


def save_part(state: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file of `state` (CPU copies of tensors that share storage or sit elsewhere)."""
    own = {}
    for key, t in state.items():
        n = t.numel() * t.element_size()
        # safetensors refuses tensors that share storage: give each its own.
        own[key] = (t.clone() if t.storage_offset() or t.untyped_storage().nbytes() != n else t).cpu()
    save_file(own, path, metadata={"format": "pt"})


def write_index(folder: Path, index: dict[str, str], total: int) -> None:
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2))


def _save_shards(state: dict[str, torch.Tensor], folder: Path, max_bytes: int) -> list[str]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    if len(shards) == 1:
        save_part(shards[0], folder / "model.safetensors")
        return ["model.safetensors"]
    names, index = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_part(shard, folder / fname)
        names.append(fname)
        index.update({k: fname for k in shard})
    write_index(folder, index, sum(t.numel() * t.element_size() for t in state.values()))
    return names


def quantized_config(model_config, specs: dict, float_linears: list[str], actorder: str | None,
                     activations: ActSpec | None, transforms: dict | None = None):
    """A copy of the model's config with its quantization_config (names as the checkpoint's);
    transforms: compressed-tensors' transform_config of online rotations (quantkit.algorithms.rotation)."""
    qconfig = build_quantization_config(specs, float_linears, actorder, activations)
    if transforms is not None:
        qconfig["transform_config"] = transforms
    config = copy.deepcopy(model_config)
    config.quantization_config = qconfig
    return config


def write_folder_files(tmp: Path, config, generation_config, tokenizer, recipe_yaml: str,
                       extra_files: dict[str, bytes] | None, report: dict, files: list[str],
                       sizes: dict[str, int] | None = None) -> dict:
    """Everything but the weights: config, generation config, tokenizer, recipe, extras, report
    (with the weight files and their bytes on disk: `sizes` for files not yet under their
    name). Returns the report as written."""
    config.save_pretrained(tmp)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / RECIPE_FILE).write_text(recipe_yaml)
    for fname, data in (extra_files or {}).items():
        (tmp / fname).write_bytes(data)
    sizes = sizes or {}
    report = dict(report, files=files, bytes_on_disk=sum(sizes[f] if f in sizes else (tmp / f).stat().st_size
                                                         for f in files))
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def write_checkpoint(
    out_dir: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer,
    weights: dict[str, QuantizedWeight],
    recipe_yaml: str,
    report: dict,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    actorder: str | None = None,
    extra_files: dict[str, bytes] | None = None,
    activations: ActSpec | None = None,
    input_scales: dict[str, torch.Tensor] | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
    transforms: dict | None = None,
) -> Path:
    """Write the checkpoint atomically and return its folder.

    actorder: compressed-tensors' label for how columns were ordered when
    rounding ("weight"); weights that carry g_idx are always "group".
    extra_files: more files to put in the folder (name -> bytes), e.g. plots.
    activations: the W8A8 input quantization (None: weight-only); input_scales:
    linear name -> calibrated per-tensor scale, for static activations.
    inputs: the paths the run read (model, recipe, data): the output may not
    overlap them (quantkit.checkpoint.output).
    Every float tensor is checked to be finite before anything is written.
    """
    family = family_for(model.config)
    float_linears = [checkpoint_name(family, n) for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n not in weights]
    # act-order with g_idx is compressed-tensors' actorder "group"
    if any(qw.g_idx is not None for qw in weights.values()):
        actorder = "group"
    config = quantized_config(model.config, {checkpoint_name(family, n): qw.spec for n, qw in weights.items()},
                              float_linears, actorder, activations, transforms)
    state = {checkpoint_name(family, k): t for k, t in quantized_state_dict(model, weights, activations, input_scales).items()}
    check_finite_state(state)
    with atomic_output(out_dir, force, inputs) as tmp:
        files = _save_shards(state, tmp, max_shard_bytes)
        write_folder_files(tmp, config, getattr(model, "generation_config", None), tokenizer, recipe_yaml,
                           extra_files, report, files)
    return Path(out_dir).expanduser().resolve()
