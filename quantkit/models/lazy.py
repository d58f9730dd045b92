"""A float model whose weights stay in their files until the driver reaches them.

`lazy_model` builds the model a folder's config describes with every parameter
on the meta device (buffers, such as the rotary tables, are computed as usual),
and keeps a map of the folder's safetensors files. The driver then calls

    materialize(module, prefix)   read the module's parameters from the files
                                  (one tensor at a time, cast to the model's dtype)
    release(module)               put them back on the meta device

so that a quantization holds the embeddings (while block 0's inputs are
captured), one decoder block, and at the end the final norm and the output
head: peak memory does not grow with depth. Tensor names in the files are the
ones save_pretrained writes (quantkit.models.families.checkpoint_name: a
mixture of experts' per-expert linears, Mixtral's block_sparse_moe).

A folder is read lazily only when every parameter is found under that name
with its shape; anything else (a .gguf, .bin weights, a hub id, names
transformers converts at load, such as fused expert tensors) is loaded whole by
quantkit.models.loader, and `lazy_model` says why. GGUF files are always loaded
whole: transformers' reader dequantizes the whole file in one pass, and GGUF
models small enough to ship as one file fit in memory anyway.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from quantkit.errors import ModelLoadError
from quantkit.formats.finite import all_finite
from quantkit.models.families import Family, attention_implementation, checkpoint_name, family_for
from quantkit.models.moe import unfuse_experts


CHUNK_BYTES = 64 * 2**20  # a tensor larger than this is read in slices (WeightFiles._read_in_chunks)
_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


def tensor_nbytes(dtype: str, shape) -> int:
    """Bytes of a tensor of safetensors dtype name `dtype` and `shape`."""
    return math.prod(shape) * _DTYPE_BYTES.get(dtype, 4)


class WeightFiles:
    """Tensor name -> the safetensors file of a model folder holding it (one file or an index).

    Files are opened for one read and closed again: safetensors maps a file into memory, and a
    mapping kept open would keep every page read through it (and every page a tensor built on it
    was written to) in this process's resident memory until the end. Tensors are copied out of
    the mapping, so the quantizer's in-place writes never touch it."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        self.files = files
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            with safe_open(str(folder / name), "pt") as handle:
                for key in handle.keys():
                    self.where[key] = name
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors `keys`, each file opened once and closed again."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.where[key], []).append(key)
        for name, wanted in by_file.items():
            with safe_open(str(self.folder / name), "pt") as handle:
                for key in wanted:
                    sl = handle.get_slice(key)
                    if tensor_nbytes(sl.get_dtype(), self.shapes[key]) <= CHUNK_BYTES or len(self.shapes[key]) == 0:
                        out[key] = handle.get_tensor(key).clone()
            for key in wanted:
                if key not in out:
                    out[key] = self._read_in_chunks(name, key)
        return out

    def _read_in_chunks(self, name: str, key: str) -> torch.Tensor:
        """A large tensor (an embedding, an output head) read a slice of rows at a time, the file
        opened and closed for each, so its pages are never resident all at once beside the copy."""
        from safetensors import safe_open

        shape = self.shapes[key]
        rows = max(1, CHUNK_BYTES // max(1, math.prod(shape[1:]) * 4))
        out = None
        for start in range(0, shape[0], rows):
            with safe_open(str(self.folder / name), "pt") as handle:
                part = handle.get_slice(key)[start: start + rows]
            if out is None:
                out = torch.empty(shape, dtype=part.dtype)
            out[start: start + part.shape[0]] = part
            del part
        return out

    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in self.files)


class LazyWeights:
    """Where a lazily built model's parameters come from, and how they are put back."""

    def __init__(self, files: WeightFiles, family: Family, tied: bool) -> None:
        self.files, self.family, self.tied = files, family, tied

    def key(self, name: str) -> str:
        """The file's tensor name of the model's parameter `name`."""
        if self.tied and name == f"{self.family.lm_head}.weight":
            name = f"{self.family.embed}.weight"  # written once, as the embedding
        return checkpoint_name(self.family, name)

    def materialize(self, module: torch.nn.Module, prefix: str) -> None:
        """Read every parameter of `module` (named `prefix` in the model) that is on the meta device."""
        self.install(module, self.read(module, prefix))

    def read(self, module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors of `module`'s parameters still on the meta device, by parameter name, read
        from the files and checked; nothing in `module` changes (so another thread may read ahead)."""
        wanted = {name: self.key(f"{prefix}.{name}" if prefix else name)
                  for name, p in module.named_parameters() if p.device.type == "meta"}
        dtypes = {name: p.dtype for name, p in module.named_parameters()}
        tensors = self.files.read(list(wanted.values()))
        out = {}
        for name, key in wanted.items():
            t = tensors.pop(key).to(dtypes[name])
            if not all_finite(t):
                raise ModelLoadError(f"{key} in {self.files.folder} contains NaN or Inf; refusing to quantize")
            out[name] = t
        return out

    @staticmethod
    def install(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Put read tensors in place of `module`'s meta parameters (those read already stay)."""
        for name, p in list(module.named_parameters()):
            if name in tensors and p.device.type == "meta":
                owner, _, leaf = name.rpartition(".")
                sub = module.get_submodule(owner) if owner else module
                sub._parameters[leaf] = torch.nn.Parameter(tensors[name], requires_grad=False)

    def release(self, module: torch.nn.Module) -> None:
        """Every parameter of `module` back on the meta device: its memory is freed, and handed back
        to the system (malloc_trim), or the heap's free holes grow the process block after block."""
        for sub in module.modules():
            for leaf, p in list(sub._parameters.items()):
                if p is not None and p.device.type != "meta":
                    sub._parameters[leaf] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        _trim()


def _trim() -> None:
    """glibc's malloc_trim(0), where there is one (measured: a Llama-3-8B-shaped run's resident
    memory after each block stayed at 1.25 GiB with it, and crept from 1.1 to 1.5 GiB over 8 blocks
    without it)."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def why_not_lazy(source: str) -> str | None:
    """None when `source` can be read lazily (a local folder of safetensors files); else why not."""
    path = Path(source)
    if source.endswith(".gguf"):
        return "a .gguf file is dequantized whole by transformers' reader"
    if not path.is_dir():
        return "not a local folder (a hub id is loaded by transformers)"
    if not any(path.glob("*.safetensors")):
        return "the folder holds no .safetensors weights"
    return None


def _named_dtype(config):
    return getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)


def config_dtype(config) -> torch.dtype | None:
    """The float dtype a model config names (its dtype or torch_dtype field, "torch." prefix or
    not; float32 when it names none), None when what it names is not a float type."""
    dtype = _named_dtype(config) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def lazy_model(source: str, config) -> tuple[torch.nn.Module, LazyWeights] | str:
    """(skeleton, its weights) for a local safetensors folder, or the reason it must be loaded whole.
    The skeleton is transformers' model class for `config`, in the folder's dtype, eval mode, every
    parameter on the meta device; a mixture of experts has per-expert linears (as load_model's)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    why = why_not_lazy(source)
    if why is not None:
        return why
    family = family_for(config)
    dtype = config_dtype(config)
    if dtype is None:
        return f"its config's dtype {_named_dtype(config)!r} is not a float type"
    try:
        files = WeightFiles(Path(source))
    except Exception as e:  # a broken header: the whole-model loader names it
        return f"its weight files cannot be indexed ({type(e).__name__})"
    kwargs = {"dtype": dtype}
    attention = attention_implementation(config)
    if attention is not None:
        kwargs["attn_implementation"] = attention
    # accelerate's empty init keeps buffers (rotary tables) real; it unties the output head, tied back below
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    unfuse_experts(model, family)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    weights = LazyWeights(files, family, tied)
    for name, p in model.named_parameters(remove_duplicate=False):
        key = weights.key(name)
        if key not in files.shapes:
            return f"its files lack {key} under the name save_pretrained writes (transformers converts them at load)"
        if files.shapes[key] != tuple(p.shape):
            return f"{key} is {list(files.shapes[key])} in the files, {list(p.shape)} in the model"
    model.eval()
    model.requires_grad_(False)
    return model, weights

