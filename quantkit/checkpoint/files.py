"""The files of a checkpoint folder: its JSON files, its weight files, their safetensors headers.

Nothing here reads tensor data. safetensors itself checks a header against
the file (offsets, sizes, dtypes; a truncated data section is refused at
open); its errors become CheckpointError naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from quantkit.checkpoint.config import described, printable, show, typed
from quantkit.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# leaf names of tensors that only a quantized layout stores (ours, AWQ/GPTQ, bitsandbytes, FP8)
QUANTIZED_LEAVES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "input_scale",
                    "qweight", "qzeros", "scales", "g_idx", "SCB", "weight_scale_inv", "absmax", "quant_map")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it."""

    file: str  # the file's name, inside the folder
    dtype: str  # safetensors' name: F32, BF16, I32, F8_E4M3, ...
    shape: tuple[int, ...]


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object; anything else is a CheckpointError naming it."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an integer beyond Python's digit limit, deep nesting
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__} {show(data)}")
    return data


def _inside(file: Path, folder: Path) -> bool:
    """Whether `file` (after symlinks) lies in `folder`, or in the blobs of the Hugging Face
    cache when `folder` is one of its snapshots (there every file is a symlink to a blob)."""
    real = file.resolve()
    homes = [folder]
    if folder.parent.name == "snapshots":
        homes.append((folder.parent.parent / "blobs").resolve())
    return any(real.is_relative_to(home) for home in homes)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of the checkpoint: model.safetensors, or those its index names."""
    index = folder / INDEX_FILE
    if index.is_file():
        data = read_json_object(index, "safetensors index")
        weight_map = typed(data.get("weight_map"), "object", f"{index}: weight_map")
        names = set()
        for key, name in weight_map.items():
            typed(name, "string", f"{index}: weight_map.{printable(key)}")
            if not name or name in (".", "..") or "/" in name or "\\" in name or not name.isprintable():
                raise CheckpointError(f"{index}: weight_map.{printable(key)} is {show(name)}: a weight file must be a plain "
                                      f"file name inside {folder}")
            names.add(name)
        if not names:
            raise CheckpointError(f"{index}: weight_map names no tensor")
        files = [folder / n for n in sorted(names)]
    elif (folder / SINGLE_FILE).exists():
        files = [folder / SINGLE_FILE]
    else:
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf") or
                       (p.suffix == ".safetensors"))
        hint = f"; it holds {', '.join(other[:3])} (quantkit reads {SINGLE_FILE} or an index of safetensors shards)" if other else ""
        raise CheckpointError(f"checkpoint {folder} is missing weight files: {folder / SINGLE_FILE}{hint}")
    outside = [f.name for f in files if f.is_symlink() and not _inside(f, folder)]
    if outside:
        raise CheckpointError(f"checkpoint {folder}: {', '.join(outside)} link(s) outside the folder; refusing to follow")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is missing weight files: {', '.join(missing)}")
    return files


def read_headers(files: list[Path], folder: Path) -> dict[str, TensorInfo]:
    """Every tensor's dtype and shape, from the safetensors headers alone."""
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as reader:
                found = [(k, reader.get_slice(k)) for k in reader.keys()]
                found = [(k, s.get_dtype(), tuple(s.get_shape())) for k, s in found]
        except Exception as e:  # safetensors' (Rust) errors, OSError: whatever it raises, the file is unusable
            raise CheckpointError(f"corrupted safetensors file {f}: {described(e)}") from e
        for key, dtype, shape in found:
            if key in tensors:
                raise CheckpointError(f"checkpoint {folder}: tensor {printable(key)} is stored twice, in {tensors[key].file} "
                                      f"and {f.name}")
            tensors[key] = TensorInfo(f.name, dtype, shape)
    return tensors


def looks_quantized(tensors: dict[str, TensorInfo]) -> str | None:
    """The first tensor name only a quantized layout stores, if any."""
    return next((k for k in tensors if k.rpartition(".")[2] in QUANTIZED_LEAVES or "quant_state" in k), None)
