"""Read a quantized checkpoint: compressed-tensors pack-quantized layers become IntWeightLinear,
int-quantized / float-quantized (W8A8, W4A8) ones W8A8Linear, AWQ GEMM layers IntWeightLinear
(4-bit, asymmetric).

Nothing is built before the folder passed quantkit.checkpoint.validate (config.json
and the safetensors headers against each other). While the tensors are read,
the few values a layout depends on are checked too (weight_shape, g_idx, the
range of int-quantized weights of fewer than 8 bits), and every float tensor
must be finite.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from quantkit.checkpoint.awq import awq_to_compressed
from quantkit.checkpoint.config import described, online_transforms, printable, show
from quantkit.checkpoint.files import looks_quantized, read_headers, read_json_object, weight_files
from quantkit.checkpoint.validate import Checkpoint, QuantLinear, read_config, validate_checkpoint
from quantkit.checkpoint.writer import RECIPE_FILE, REPORT_FILE
from quantkit.errors import CheckpointError
from quantkit.formats import IntSpec
from quantkit.formats.finite import all_finite
from quantkit.formats.hadamard import online_hook
from quantkit.models import LoadedModel
from quantkit.models.families import attention_implementation, module_name
from quantkit.models.lazy import config_dtype
from quantkit.models.moe import unfuse_experts
from quantkit.nn import IntWeightLinear, W8A8Linear

__all__ = ["checkpoint_summary", "is_quantized_checkpoint", "load_checkpoint", "read_config", "read_state_dict"]


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """Whether api.load hands `path` to this reader (which reads it or says why not): a folder
    whose config.json has a quantization_config (any method), that holds a GPTQ
    quantize_config.json, or whose weights have names only a quantized layout uses."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        return False
    if (folder / "quantize_config.json").is_file():
        return True
    try:
        raw = json.loads((folder / "config.json").read_text("utf-8"))
    except (OSError, ValueError, RecursionError):
        raw = None  # unreadable: the tensor names below decide who reports it
    if isinstance(raw, dict) and raw.get("quantization_config") is not None:
        return True
    try:
        return looks_quantized(read_headers(weight_files(folder), folder)) is not None
    except CheckpointError:
        return False  # not readable as weights: the float loader says why


def read_state_dict(ck: Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of a validated checkpoint; a float tensor holding NaN or Inf is refused by name."""
    state: dict[str, torch.Tensor] = {}
    for f in ck.files:
        try:
            with safe_open(str(f), framework="pt") as reader:
                tensors = {key: reader.get_tensor(key) for key in reader.keys()}
        except Exception as e:  # safetensors' (Rust) errors, OSError: the file changed or is unreadable
            raise CheckpointError(f"corrupted safetensors file {f}: {described(e)}") from e
        for key, t in tensors.items():  # one reduction per tensor
            if not all_finite(t):
                raise CheckpointError(f"{f}: tensor {printable(key)} holds NaN or Inf values: the checkpoint is corrupted")
        state.update(tensors)
    return state


def _check_values(state: dict[str, torch.Tensor], ck: Checkpoint) -> None:
    """The values a layout depends on (its dtypes and shapes are already checked): pack-quantized's
    weight_shape and g_idx, and the range of int-quantized weights of fewer than 8 bits (W4A8:
    -8..7 in an int8 tensor, which could hold any value)."""
    for name, lin in ck.linears.items():
        spec, weight = lin.scheme.weights, state.get(f"{name}.weight")
        if lin.scheme.activations is not None and isinstance(spec, IntSpec) and spec.bits < 8 and weight.numel():
            lo, hi = (int(v) for v in torch.aminmax(weight))
            if lo < spec.qmin or hi > spec.qmax:
                raise CheckpointError(f"{ck.folder}: {name}.weight holds values {lo}..{hi}; its {spec.bits}-bit "
                                      f"weights lie in {spec.qmin}..{spec.qmax}")
        shape = state.get(f"{name}.weight_shape")
        if shape is not None and tuple(shape.tolist()) != (lin.out_features, lin.in_features):
            raise CheckpointError(f"{ck.folder}: {name}.weight_shape holds {shape.tolist()}, the model config "
                                  f"says [{lin.out_features}, {lin.in_features}]")
        g_idx = state.get(f"{name}.weight_g_idx")
        if g_idx is not None:
            groups = lin.scheme.weights.num_groups(lin.in_features)
            lo, hi = (int(v) for v in torch.aminmax(g_idx))
            if lo < 0 or hi != groups - 1:  # the kernel takes the group count from max(g_idx) + 1
                raise CheckpointError(f"{ck.folder}: {name}.weight_g_idx holds groups {lo}..{hi}; "
                                      f"its {groups} scale groups need 0..{groups - 1}")


def _empty_model(config, dtype: torch.dtype, family) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    try:
        with no_init_weights():
            attention = attention_implementation(config)
            extra = {"attn_implementation": attention} if attention else {}
            return unfuse_experts(AutoModelForCausalLM.from_config(config, dtype=dtype, **extra), family)  # per expert
    except Exception as e:  # transformers building a config validation accepted: translate whatever it raises
        raise CheckpointError(f"transformers cannot build the model: {described(e)}") from e


def _quantized_module(lin: QuantLinear, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    dtype = state[f"{lin.name}.weight_scale"].dtype
    if lin.scheme.activations is not None:
        return W8A8Linear(lin.in_features, lin.out_features, lin.scheme.weights, lin.scheme.activations,
                          bias=lin.bias, dtype=dtype)
    return IntWeightLinear(lin.in_features, lin.out_features, lin.scheme.weights, bias=lin.bias, dtype=dtype,
                           has_g_idx=f"{lin.name}.weight_g_idx" in state)


def _online_rotations(model: torch.nn.Module, ck) -> None:
    """The transform_config's input rotations as forward pre-hooks on their linears (rotated
    before the input is quantized: the W8A8 modules quantize inside forward)."""
    from quantkit.models.families import checkpoint_name

    rules = online_transforms(ck.raw["quantization_config"], str(ck.folder))
    if not rules:
        return
    for name, module in model.named_modules():
        key = checkpoint_name(ck.family, name)
        for targets, block in rules:
            if any(t.match(key) is not None if isinstance(t, re.Pattern) else t == key for t in targets):
                width = getattr(module, "in_features", None)
                if not isinstance(width, int) or width % block:
                    raise CheckpointError(f"{ck.folder}: transform_config rotates the input of {key} in blocks of "
                                          f"{block}, which its {width} input features do not divide into")
                module._quantkit_online_block = block
                module.register_forward_pre_hook(online_hook(block))
                break


def load_checkpoint(path: str | os.PathLike, backend: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """A quantized checkpoint as a model whose quantized linears are IntWeightLinear / W8A8Linear."""
    from transformers import AutoTokenizer

    ck = validate_checkpoint(path)
    state = {module_name(ck.family, k): t for k, t in read_state_dict(ck).items()}  # as validate_checkpoint reads them
    if ck.awq_group_size is not None:
        state = awq_to_compressed(state, list(ck.linears))
    _check_values(state, ck)
    if any(getattr(lin.scheme.weights, "scale_dtype", None) for lin in ck.linears.values()):
        # scales stored in a dtype of their own (IntSpec.scale_dtype): the model computes in its config's
        dtype = config_dtype(ck.config) or torch.float32
        for n in ck.linears:
            state[f"{n}.weight_scale"] = state[f"{n}.weight_scale"].to(dtype)
    scale_dtypes = {state[f"{n}.weight_scale"].dtype for n in ck.linears}
    model = _empty_model(ck.config, next(iter(scale_dtypes)) if len(scale_dtypes) == 1 else torch.float32, ck.family)
    for name, lin in ck.linears.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, _quantized_module(lin, state))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # validation compared every shape; this is a safety net
        raise CheckpointError(f"{ck.folder}: the weights do not fit the model: {described(e)}") from e
    tied = {"lm_head.weight"} if getattr(ck.config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{ck.folder}: checkpoint does not match the model: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    if tied:
        model.tie_weights()
    _online_rotations(model, ck)
    model.to(device).eval().requires_grad_(False)
    for module in model.modules():
        if isinstance(module, (IntWeightLinear, W8A8Linear)):
            module.prepare(backend)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ck.folder)
    except Exception as e:  # transformers / tokenizers: whatever they raise, the tokenizer files are unusable
        raise CheckpointError(f"cannot load the tokenizer of {ck.folder}: {described(e)}") from e
    return LoadedModel(model=model, tokenizer=tokenizer, family=ck.family, source=str(ck.folder))


# --------------------------------------------------------------------------- inspect

def _number(v: object) -> bool:
    # a huge JSON integer would overflow the CLI's float arithmetic
    return isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**63)


_ROW_FIELDS = {  # the fields of a report row the CLI reads, and the types they must have
    "name": lambda v: isinstance(v, str),
    "shape": lambda v: isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in v),
    "bits": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "group_size": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
    "symmetric": lambda v: isinstance(v, bool),
    "weight_rel_error": _number,
    "bytes_float": _number,
    "bytes_quantized": _number,
}


def normalize_report(report: dict) -> tuple[dict, list[str]]:
    """The report with every field the CLI reads of the right type: a mistyped total becomes 0,
    a mistyped text field its JSON text, a row with a mistyped field is dropped. Returns the
    report and what was changed."""
    if not report:
        return report, []
    out, problems = dict(report), []
    for key in ("bytes_float", "bytes_quantized", "bytes_on_disk"):
        if key in out and not _number(out[key]):
            problems.append(f"{key}: expected a number, got {show(out[key])}; shown as 0")
        if not _number(out.get(key)):
            out[key] = 0
    for key in ("recipe", "scheme", "model"):
        if out.get(key) is not None and not isinstance(out[key], str):
            out[key] = show(out[key])
    rows = out.get("layers", [])
    if not isinstance(rows, list):
        problems.append(f"layers: expected a list, got {show(rows)}; dropped")
        rows = []
    kept = []
    for i, row in enumerate(rows):
        bad = ([k for k, ok in _ROW_FIELDS.items() if not ok(row.get(k))] if isinstance(row, dict) else ["row"])
        if isinstance(row, dict) and row.get("weight_type") is not None and not isinstance(row["weight_type"], str):
            bad.append("weight_type")
        if bad:
            problems.append(f"layers[{i}]: {', '.join(bad)} missing or mistyped; row dropped")
        else:
            kept.append(row)
    out["layers"] = kept
    return out, problems


def checkpoint_summary(path: str | os.PathLike) -> dict:
    """What `quantkit inspect` shows: config, report and recipe of a checkpoint that passes
    validation (config.json against the safetensors headers; no tensor data is read)."""
    ck = validate_checkpoint(path)
    report_file, recipe_file = ck.folder / REPORT_FILE, ck.folder / RECIPE_FILE
    report, problems = normalize_report(read_json_object(report_file, "report") if report_file.is_file() else {})
    recipe = None
    if recipe_file.is_file():
        try:
            recipe = recipe_file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read the recipe {recipe_file}: {e}") from e
    return {
        "path": str(ck.folder),
        "model_type": ck.raw["model_type"],
        "quantization_config": ck.raw["quantization_config"],
        "report": report,
        "report_problems": problems,
        "recipe": recipe,
        "files": [f.name for f in ck.files],
    }
