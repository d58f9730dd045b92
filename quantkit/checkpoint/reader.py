"""Read a quantkit (compressed-tensors) checkpoint: pack-quantized layers become
IntWeightLinear, int-quantized / float-quantized (W8A8) ones W8A8Linear."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError, safe_open

from quantkit.checkpoint.config import spec_resolver
from quantkit.checkpoint.writer import RECIPE_FILE, REPORT_FILE
from quantkit.errors import CheckpointError
from quantkit.models import LoadedModel, family_for
from quantkit.nn import IntWeightLinear, W8A8Linear


def read_config(path: str | os.PathLike) -> dict:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint not found: {folder} is not a folder")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder} has no config.json: not a model checkpoint")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        return False
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return qc.get("quant_method") == "compressed-tensors"


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        files = [folder / n for n in names]
    else:
        files = [folder / "model.safetensors"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is missing weight files: {', '.join(missing)}")
    return files


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as reader:
                for key in reader.keys():
                    state[key] = reader.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"corrupted safetensors file {f}: {e}") from e
    return state


def _empty_model(config, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _replace_linears(model: torch.nn.Module, resolve, state: dict[str, torch.Tensor]) -> int:
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        scheme = resolve(name, [c.__name__ for c in type(module).__mro__])
        if scheme is None:
            continue
        make = _w8a8_linear if scheme.activations is not None else _int_weight_linear
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, make(name, module, scheme, state))
        count += 1
    return count


def _int_weight_linear(name: str, module: torch.nn.Linear, scheme, state: dict[str, torch.Tensor]) -> IntWeightLinear:
    if f"{name}.weight_packed" not in state:
        raise CheckpointError(f"checkpoint has no {name}.weight_packed although its quantization_config targets {name}")
    shape = tuple(state[f"{name}.weight_shape"].tolist())
    if shape != (module.out_features, module.in_features):
        raise CheckpointError(f"{name}.weight_shape is {shape}, the model config says {(module.out_features, module.in_features)}")
    return IntWeightLinear(
        module.in_features,
        module.out_features,
        scheme.weights,
        bias=module.bias is not None,
        dtype=state[f"{name}.weight_scale"].dtype,
        has_g_idx=f"{name}.weight_g_idx" in state,
    )


def _w8a8_linear(name: str, module: torch.nn.Linear, scheme, state: dict[str, torch.Tensor]) -> W8A8Linear:
    weight = state.get(f"{name}.weight")
    if weight is None or f"{name}.weight_scale" not in state:
        raise CheckpointError(f"checkpoint has no {name}.weight / weight_scale although its quantization_config targets {name}")
    if tuple(weight.shape) != (module.out_features, module.in_features):
        raise CheckpointError(f"{name}.weight has shape {tuple(weight.shape)}, the model config says {(module.out_features, module.in_features)}")
    want = torch.float8_e4m3fn if scheme.activations.type == "fp8" else torch.int8
    if weight.dtype != want:
        raise CheckpointError(f"{name}.weight is {weight.dtype}; {scheme.format} stores {want}")
    if not scheme.activations.dynamic and f"{name}.input_scale" not in state:
        raise CheckpointError(f"checkpoint has no {name}.input_scale although its activations are static")
    scale = state[f"{name}.weight_scale"]
    return W8A8Linear(module.in_features, module.out_features, scheme.weights, scheme.activations,
                      bias=module.bias is not None, dtype=scale.dtype)


def load_checkpoint(path: str | os.PathLike, backend: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """A quantized checkpoint as a model whose targeted linears are IntWeightLinear / W8A8Linear."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(path).expanduser().resolve()
    raw = read_config(folder)
    qconfig = raw.get("quantization_config")
    if not qconfig:
        raise CheckpointError(f"{folder} is not a quantized checkpoint (config.json has no quantization_config)")
    # from config.json itself: transformers may fail obscurely on an unsupported model_type
    family = family_for(SimpleNamespace(model_type=raw.get("model_type"), architectures=raw.get("architectures")))
    resolve = spec_resolver(qconfig, str(folder / "config.json"))
    state = read_state_dict(weight_files(folder))
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"cannot read the model config of {folder}: {e}") from e
    del config.quantization_config  # built as a float model; we swap the linears ourselves
    scale_dtypes = {t.dtype for k, t in state.items() if k.endswith(".weight_scale")}
    dtype = next(iter(scale_dtypes)) if len(scale_dtypes) == 1 else torch.float32
    model = _empty_model(config, dtype)
    if _replace_linears(model, resolve, state) == 0:
        raise CheckpointError(f"{folder}: the quantization_config matches no linear layer of the model")
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{folder}: checkpoint does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if tied:
        model.tie_weights()
    model.to(device).eval().requires_grad_(False)
    for module in model.modules():
        if isinstance(module, (IntWeightLinear, W8A8Linear)):
            module.prepare(backend)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer of {folder}: {e}") from e
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, source=str(folder))


def checkpoint_summary(path: str | os.PathLike) -> dict:
    """What `quantkit inspect` shows: config, report and recipe of a checkpoint."""
    folder = Path(path).expanduser().resolve()
    raw = read_config(folder)
    report_file, recipe_file = folder / REPORT_FILE, folder / RECIPE_FILE
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    return {
        "path": str(folder),
        "model_type": raw.get("model_type"),
        "quantization_config": raw.get("quantization_config"),
        "report": report,
        "recipe": recipe_file.read_text() if recipe_file.is_file() else None,
        "files": [f.name for f in weight_files(folder)],
    }
