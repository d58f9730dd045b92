"""Check a checkpoint folder against its config.json before building anything.

Each step is cheap and ends, on failure, in one CheckpointError:
  1. config.json is a JSON object whose model fields the build needs have the
     right types and values (before transformers sees them);
  2. its quantization_config is one quantkit reads (compressed-tensors, AWQ
     GEMM), or a foreign layout, refused by name (quantkit.checkpoint.foreign);
  3. the weight files (index.json names plain files inside the folder) have
     readable safetensors headers; no tensor data is read;
  4. num_hidden_layers is no more than the blocks the headers hold, so the
     skeleton below cannot hang on a corrupted layer count;
  5. the model is built on the meta device (no memory);
  6. every tensor the model and the quantization_config imply is compared
     with the headers: names, dtypes, shapes (`compare`).

The skeleton is quantkit's (a mixture of experts with per-expert linears,
quantkit.models.moe); the checkpoint's tensor and layer names are those
transformers writes, read here through the family's renames (module_name)
and compared in the skeleton's names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from quantkit.checkpoint.awq import awq_layout, awq_quantizes, awq_scheme, parse_awq_config
from quantkit.checkpoint.config import Expected, LinearScheme, described, printable, spec_resolver, typed
from quantkit.checkpoint.files import TensorInfo, looks_quantized, read_headers, read_json_object, weight_files
from quantkit.checkpoint.foreign import foreign_method, refusal, unlabelled
from quantkit.checkpoint.modelconfig import check_model_config
from quantkit.errors import CheckpointError, ModelLoadError
from quantkit.models import Family, empty_model, family_for
from quantkit.models.families import checkpoint_name, module_name

PLAIN_FLOAT = ("F16", "BF16", "F32", "F64")  # embeddings, norms, float linears: cast to the model's dtype
_OTHER_DTYPES = {torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32",
          "I8": "int8", "U8": "uint8", "F8_E4M3": "float8_e4m3fn", "BOOL": "bool"}
SHOWN = 5  # problems named in the error; the rest are counted
Resolver = Callable[[str, Iterable[str]], LinearScheme | None]  # (linear name, class names) -> scheme


@dataclass(frozen=True)
class QuantLinear:
    """A linear the checkpoint stores quantized: its scheme once read, and its on-disk tensors."""

    name: str
    scheme: LinearScheme
    out_features: int
    in_features: int
    bias: bool
    layout: dict[str, Expected]


@dataclass
class Checkpoint:
    """A folder that passed validation: what the reader needs to build the model."""

    folder: Path
    raw: dict  # config.json
    family: Family
    config: object  # transformers' config, without quantization_config
    files: list[Path]
    tensors: dict[str, TensorInfo]  # from the safetensors headers
    linears: dict[str, QuantLinear]
    awq_group_size: int | None  # the AWQ GEMM layout, to be converted at load; None: compressed-tensors


def read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint not found: {folder} is not a folder")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f" (it holds {', '.join(ggufs[:3])}: pass a .gguf file itself as a float model)" if ggufs else ""
        raise CheckpointError(f"{folder} has no config.json: not a model checkpoint{hint}")
    return read_json_object(cfg_file, "config.json")


def _block_count(tensors: dict[str, TensorInfo], family: Family) -> int:
    pattern = re.compile(re.escape(family.blocks) + r"\.(\d+)\.")
    return len({m.group(1) for key in tensors if (m := pattern.match(key))})


def transformers_config(raw: dict, where: str):
    """transformers' config from the checked config.json, without its quantization_config."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fields = {k: v for k, v in raw.items() if k != "quantization_config"}
    try:
        return CONFIG_MAPPING[raw["model_type"]].from_dict(fields)
    except Exception as e:  # transformers' own validation: any error it raises is about this file
        raise CheckpointError(f"{where}: transformers refuses the model config: {described(e)}") from e


def meta_model(config, where: str) -> torch.nn.Module:
    """The model's skeleton on the meta device: every module and shape, no memory."""
    try:
        return empty_model(config)
    except ModelLoadError as e:
        raise CheckpointError(f"{where}: {e}") from e


def _quantized_linears(model: torch.nn.Module, resolve: Resolver | None, awq_group: int | None, skip: list[str],
                       where: str, family: Family) -> dict[str, QuantLinear]:
    """The linears the quantization_config quantizes (compressed-tensors: by `resolve`, which reads
    the checkpoint's names; AWQ: all but the output embedding and `skip`), each with its layout."""
    out_emb = model.get_output_embeddings()
    out_name = next((n for n, m in model.named_modules() if m is out_emb), None)
    linears = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        n, k, bias = module.out_features, module.in_features, module.bias is not None
        if awq_group is not None:
            if awq_quantizes(checkpoint_name(family, name), skip, out_name):
                linears[name] = QuantLinear(name, awq_scheme(awq_group), n, k, bias, awq_layout(name, n, k, awq_group, bias))
            continue
        scheme = resolve(checkpoint_name(family, name), [c.__name__ for c in type(module).__mro__])
        if scheme is not None:
            try:
                layout = scheme.layout(name, n, k, bias)
            except ValueError as e:  # a width the spec cannot describe
                raise CheckpointError(f"{where}: {name}: {e}") from None
            linears[name] = QuantLinear(name, scheme, n, k, bias, layout)
    tied = out_name is not None and model.get_input_embeddings() is not None and \
        out_emb.weight is model.get_input_embeddings().weight
    if tied and out_name in linears:
        raise CheckpointError(f"{where}: tie_word_embeddings ties {out_name} to the input embeddings, but "
                              f"quantization_config quantizes it; a tied {out_name} stays float (add it to ignore)")
    return linears


def expected_tensors(model: torch.nn.Module, linears: dict[str, QuantLinear]) -> dict[str, Expected]:
    """Every tensor the checkpoint must hold, in the model's order."""
    expected: dict[str, Expected] = {}
    seen: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if owner in linears:
            expected.update(linears[owner].layout)
            continue
        if id(t) in seen:  # tied (lm_head to the embeddings): stored once, under its first name
            continue
        seen.add(id(t))
        dtypes = PLAIN_FLOAT if t.is_floating_point() else (_OTHER_DTYPES.get(t.dtype, str(t.dtype)),)
        expected[key] = Expected(dtypes, tuple(t.shape), "a float parameter of the model")
    return expected


def _dtype(names: tuple[str, ...] | str) -> str:
    if isinstance(names, str):
        return _NAMES.get(names, names)
    return "float" if set(names) >= {"F16", "BF16", "F32"} else "/".join(_NAMES.get(n, n) for n in names)


def _unexpected_hint(key: str, linears: dict[str, QuantLinear], float_linears: set[str]) -> str:
    owner, _, leaf = key.rpartition(".")
    if owner in linears:
        if leaf == "weight_zero_point":
            return " (config.json says symmetric: no zero points)"
        return f" (not part of quantized {owner}'s layout)"
    if owner in float_linears:
        return f" (config.json leaves {owner} in float: ignored or not targeted)"
    return ""


def compare(expected: dict[str, Expected], tensors: dict[str, TensorInfo], linears: dict[str, QuantLinear],
            float_linears: set[str]) -> list[str]:
    """What differs between the tensors the config implies and those the headers hold."""
    wrong, missing = [], []
    for key, exp in expected.items():
        info = tensors.get(key)
        want = f"{_dtype(exp.dtypes)} {list(exp.shape)} ({exp.why})"
        if info is None:
            if not exp.optional:
                missing.append(f"{key}: missing (expected {want})")
        elif info.dtype not in exp.dtypes or info.shape != exp.shape:
            wrong.append(f"{printable(info.file)}: {key}: expected {want}, found {_dtype(printable(info.dtype))} "
                         f"{list(info.shape)}")
    unexpected = [f"{printable(info.file)}: {printable(key)}: unexpected tensor{_unexpected_hint(key, linears, float_linears)}"
                  for key, info in tensors.items() if key not in expected]
    return wrong + missing + unexpected


def problems_error(folder: Path, files: list[Path], problems: list[str]) -> CheckpointError:
    shown = "; ".join(problems[:SHOWN]) + (f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else "")
    names = ", ".join(printable(f.name) for f in files)
    return CheckpointError(f"{folder}: the weights ({names}) do not match config.json: {shown}")


def _quantization(folder: Path, raw: dict) -> tuple[Resolver | None, int | None, list[str]]:
    """(compressed-tensors resolver or None, AWQ group size or None, AWQ modules_to_not_convert),
    or a refusal naming what the folder is."""
    where = str(folder / "config.json")
    qconfig = raw.get("quantization_config")
    if qconfig is None:
        if (folder / "quantize_config.json").is_file():
            raise CheckpointError(refusal(folder, "a GPTQ checkpoint (qweight/qzeros/scales/g_idx)", "w4a16-gptq"))
        hit = looks_quantized(read_headers(weight_files(folder), folder))
        if hit:
            raise CheckpointError(unlabelled(folder, hit))
        raise CheckpointError(f"{folder} is not a quantized checkpoint (config.json has no quantization_config)")
    qconfig = typed(qconfig, "object", f"{where}: quantization_config")
    foreign = foreign_method(folder, qconfig)
    if foreign:
        raise CheckpointError(foreign)
    if isinstance(qconfig.get("quant_method"), str) and qconfig["quant_method"].strip().lower() == "awq":
        group, skip = parse_awq_config(qconfig, where)
        return None, group, skip
    return spec_resolver(qconfig, where), None, []  # every field type-checked now, before any file is read


def validate_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Validate a checkpoint folder from its config.json and safetensors headers; no tensor data is read."""
    folder = Path(path).expanduser().resolve()
    raw = read_config(folder)
    where = str(folder / "config.json")
    resolve, awq_group, skip = _quantization(folder, raw)
    model_type = typed(raw.get("model_type"), "string", f"{where}: model_type")
    family = family_for(SimpleNamespace(model_type=model_type, architectures=raw.get("architectures")))
    check_model_config(raw, where)
    files = weight_files(folder)
    tensors = {module_name(family, k): info for k, info in read_headers(files, folder).items()}
    blocks, layers = _block_count(tensors, family), raw["num_hidden_layers"]
    if layers > blocks:  # checked before the skeleton: a corrupted count must not build millions of blocks
        raise CheckpointError(f"{where}: num_hidden_layers is {layers}, but the weight files hold tensors of "
                              f"{blocks} blocks ({family.blocks}.N)")
    config = transformers_config(raw, where)
    model = meta_model(config, where)
    linears = _quantized_linears(model, resolve, awq_group, skip, where, family)
    if not linears:
        raise CheckpointError(f"{folder}: the quantization_config matches no linear layer of the model")
    float_linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - set(linears)
    problems = compare(expected_tensors(model, linears), tensors, linears, float_linears)
    if problems:
        raise problems_error(folder, files, problems)
    return Checkpoint(folder, raw, family, config, files, tensors, linears, awq_group)


__all__ = ["Checkpoint", "QuantLinear", "compare", "expected_tensors", "read_config", "validate_checkpoint"]
