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
from pathlib import Path

import torch

from quantkit.errors import ModelLoadError
from quantkit.formats.finite import all_finite
from quantkit.models.families import Family, attention_implementation, checkpoint_name, family_for
from quantkit.models.moe import unfuse_experts


class WeightFiles:
    """Tensor name -> the safetensors file of a model folder holding it (one file or an index)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._open = {}
        for name in files:
            handle = safe_open(str(folder / name), "pt")
            self._open[name] = handle
            for key in handle.keys():
                self.where[key] = name
                self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._open[self.where[key]].get_tensor(key)

    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in self._open)


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
        for name, p in list(module.named_parameters()):
            if p.device.type != "meta":
                continue
            key = self.key(f"{prefix}.{name}" if prefix else name)
            t = self.files.get(key).to(p.dtype)
            if not all_finite(t):
                raise ModelLoadError(f"{key} in {self.files.folder} contains NaN or Inf; refusing to quantize")
            owner, _, leaf = name.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            sub._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)

    def release(self, module: torch.nn.Module) -> None:
        """Every parameter of `module` back on the meta device: its memory is freed."""
        for sub in module.modules():
            for leaf, p in list(sub._parameters.items()):
                if p is not None and p.device.type != "meta":
                    sub._parameters[leaf] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


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
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return f"its config's dtype {dtype!r} is not a float type"
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

