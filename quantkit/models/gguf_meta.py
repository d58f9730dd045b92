"""What a .gguf file says about its model, against the config transformers' GGUF reader built from it.

transformers' reader (modeling_gguf_pytorch_utils + integrations/ggml.py GGUF_CONFIG_MAPPING) rebuilds
a config from a fixed set of keys per architecture; every other field takes the config class's
default, whatever the file says. Some of those defaults give another model than the file's: the
weights load, the logits are another model's (Gemma 2's soft-caps, Gemma 3's linear rope scaling), or
it cannot load at all (Qwen3's head width, the Qwen-MoE expert widths). `check_gguf_config` compares
the two, key by key from the table FIELDS, and either repairs the config (one field with one meaning,
after which the model is the original's: tests/test_gguf_families.py proves each) or refuses the file
with one ModelLoadError naming every disagreement.

Why a reader of its own: gguf.GGUFReader (which transformers uses) parses every key/value and every
array element into numpy views, the tokenizer's list of token strings included: about 30 s for a
262k-token vocabulary (Gemma 3) on a busy 2-core machine, on top of the same parse transformers
already does. `read_gguf_meta` reads only the header, the scalar values of the key/value section
(an array is skipped: a string array by a walk over its lengths, never decoding one) and the tensor
names: tens of milliseconds for that file. `iter_gguf_strings` reads one string array (the token
list, for quantkit.models.gguf_tokenizer) from the offset the walk noted, only as far as asked.
"""

from __future__ import annotations

import copy
import logging
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from quantkit.errors import ModelLoadError

log = logging.getLogger("quantkit")

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # gguf-py's reader (and so transformers') reads these

# GGUF value types (gguf.GGUFValueType): struct format, size; 8 string, 9 array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9
TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
              8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}


@dataclass(frozen=True)
class GGUFArray:
    """An array value, left unread: its elements' type and how many there are (and, for
    iter_gguf_strings, the byte offset of its first element: not part of its value)."""
    item_type: str
    length: int
    offset: int = field(default=-1, compare=False, repr=False)


@dataclass(frozen=True)
class GGUFMeta:
    """A GGUF file's header, scalar key/values (arrays as GGUFArray) and tensor names."""
    path: str
    version: int
    metadata: dict[str, Any]
    tensor_names: tuple[str, ...] = field(default=())

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def arch_value(self, suffix: str):
        """The value of `{general.architecture}.{suffix}`, None when the file has no such key."""
        return self.metadata.get(f"{self.architecture}.{suffix}")


class _Walk:
    """A cursor over the file's bytes; every read past the end is a truncated file."""

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def bad(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path} is not a readable GGUF file: {what}")

    def truncated(self, where: str) -> ModelLoadError:
        return self.bad(f"it ends at byte {self.size}, inside {where} (a truncated or incomplete download?)")

    def need(self, n: int, where: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.truncated(where)

    def take(self, fmt: str, n: int, where: str):
        self.need(n, where)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self, where: str) -> str:
        n = self.take("<Q", 8, where)
        self.need(n, where)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.bad(f"{where} is not UTF-8 ({e})") from e

    def value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            fmt, n = _SCALARS[vtype]
            return self.take(fmt, n, f"the value of {key}")
        if vtype == _STRING:
            return self.string(f"the value of {key}")
        if vtype == _ARRAY:
            item = self.take("<I", 4, f"the array {key}")
            count = self.take("<Q", 8, f"the array {key}")
            start = self.pos
            self.skip_array(item, count, key)
            return GGUFArray(TYPE_NAMES[item], count, start)
        raise self.bad(f"key {key} has value type {vtype}, which GGUF does not define")

    def skip_array(self, item: int, count: int, key: str) -> None:
        where = f"the array {key}"
        if item in _SCALARS:
            self.need(count * _SCALARS[item][1], where)
            self.pos += count * _SCALARS[item][1]
        elif item == _STRING:
            self.need(count * 8, where)  # each element is at least its 8-byte length
            buf, pos, size, unpack = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
            try:
                for _ in range(count):
                    pos += 8 + unpack(buf, pos)[0]
            except struct.error:
                raise self.truncated(where) from None
            if pos > size:
                raise self.truncated(where)
            self.pos = pos
        elif item == _ARRAY:
            self.need(count * 12, where)  # each element is at least its item type and length
            for _ in range(count):
                sub = self.take("<I", 4, where)
                self.skip_array(sub, self.take("<Q", 8, where), key)
        else:
            raise self.bad(f"array {key} has element type {item}, which GGUF does not define")


def read_gguf_meta(path: str | os.PathLike) -> GGUFMeta:
    """The header, the scalar metadata and the tensor names of the GGUF file at `path`
    (little-endian, versions 2 and 3). A missing, truncated or garbled header is a ModelLoadError."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                head = f.read(4)
                if len(head) == 4 and head != GGUF_MAGIC:
                    raise ModelLoadError(f"{path} is not a GGUF file (it starts with {head!r}, not b'GGUF')")
                raise ModelLoadError(f"{path} is not a readable GGUF file: {size} bytes, shorter than a GGUF header "
                                     f"(a truncated or incomplete download?)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, size, path)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def _parse(buf, size: int, path: str) -> GGUFMeta:
    walk = _Walk(buf, size, path)
    if buf[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it starts with {bytes(buf[:4])!r}, not b'GGUF')")
    walk.pos = 4
    version = walk.take("<I", 4, "the header")
    if version & 0xFFFF == 0 and version >> 16:
        raise walk.bad("it is a big-endian GGUF file; quantkit reads little-endian ones")
    if version not in SUPPORTED_VERSIONS:
        raise walk.bad(f"GGUF version {version}; readable: {', '.join(map(str, SUPPORTED_VERSIONS))}")
    n_tensors = walk.take("<Q", 8, "the header")
    n_kv = walk.take("<Q", 8, "the header")
    # each key/value takes at least 13 bytes, each tensor entry at least 24: a garbled count fails here
    walk.need(n_kv * 13 + n_tensors * 24, f"the {n_kv} key/values and {n_tensors} tensor entries the header announces")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = walk.string(f"key {i}")
        metadata[key] = walk.value(walk.take("<I", 4, f"the type of key {key}"), key)
    names = []
    for i in range(n_tensors):
        name = walk.string(f"the name of tensor {i}")
        n_dims = walk.take("<I", 4, f"tensor {name}")
        walk.need(n_dims * 8 + 12, f"tensor {name}")
        walk.pos += n_dims * 8 + 12  # dims, ggml type, data offset
        names.append(name)
    return GGUFMeta(path=path, version=version, metadata=metadata, tensor_names=tuple(names))


def iter_gguf_strings(path: str | os.PathLike, key: str, meta: GGUFMeta | None = None) -> Iterator[str]:
    """The elements of the string array `key` of the GGUF file at `path`, in order, decoded one at a
    time as the caller takes them (stop early and the rest is never read: Gemma 3's 262k token strings
    all take about 0.1 s). A file without that string array is a ModelLoadError."""
    path = str(path)
    meta = meta if meta is not None else read_gguf_meta(path)
    array = meta.metadata.get(key)
    if not isinstance(array, GGUFArray) or array.item_type != "string" or array.offset < 0:
        raise ModelLoadError(f"{path} has no string array {key}")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            pos, size, unpack = array.offset, len(buf), struct.Struct("<Q").unpack_from
            for i in range(array.length):
                n = unpack(buf, pos)[0] if pos + 8 <= size else size
                if pos + 8 + n > size:
                    raise ModelLoadError(f"{path} is not a readable GGUF file: it ends inside element {i} of {key}")
                try:
                    yield buf[pos + 8:pos + 8 + n].decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ModelLoadError(f"{path}: element {i} of {key} is not UTF-8 ({e})") from e
                pos += 8 + n
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


# ----------------------------------------------------------------------------- the config's values

def _head_dim(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config) -> dict:
    """The rotary parameters of the full-attention layers (Gemma 3 keeps one set per layer type:
    llama.cpp scales the global layers' only)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope.get("full_attention"), dict):
        rope = rope["full_attention"]
    return rope


def _rope_type(config) -> str:
    kind = _rope(config).get("rope_type", _rope(config).get("type")) or "default"
    return {"default": "none", "su": "longrope"}.get(kind, kind)


def _rope_factor(config):
    return None if _rope_type(config) == "none" else _rope(config).get("factor")


def _rope_attn_factor(config):
    return 1.0 if _rope_type(config) == "none" else _rope(config).get("attention_factor", 1.0)


def _rotary_dims(config) -> int:
    factor = _rope(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return int(_head_dim(config) * (factor if factor is not None else 1.0))


def _sliding_window(config):
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2's: a window length that no layer uses
        return None
    return getattr(config, "sliding_window", None) or None


def _attr(name: str) -> Callable:
    return lambda config: getattr(config, name, None)


# ----------------------------------------------------------------------------- the file's values

def _file_rope_type(meta: GGUFMeta):
    """llama.cpp writes a scaling type, or (Llama 3.1's "llama3", Phi-3's longrope) only the
    per-dimension factors as tensors, or (old files) only a linear factor."""
    kind = meta.arch_value("rope.scaling.type")
    if kind is not None:
        return kind
    if "rope_freqs.weight" in meta.tensor_names:
        return "llama3"
    if "rope_factors_long.weight" in meta.tensor_names:
        return "longrope"
    factor = meta.arch_value("rope.scaling.factor") or meta.arch_value("rope.scale_linear")
    return "linear" if factor not in (None, 1.0) else None


def _file_rope_factor(meta: GGUFMeta):
    if _file_rope_type(meta) in (None, "none"):
        return None  # no scaling: the factor, if written, is not used
    return meta.arch_value("rope.scaling.factor") or meta.arch_value("rope.scale_linear")


_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _file_query_scalar(meta: GGUFMeta):
    """Gemma's query_pre_attn_scalar is in no GGUF file: llama.cpp takes hidden / heads for the
    27B models (which it tells by their layer count) and the head width for every other size."""
    arch = meta.architecture
    if arch not in _GEMMA_27B_LAYERS:
        return None
    hidden, heads = meta.arch_value("embedding_length"), meta.arch_value("attention.head_count")
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
        return None
    if meta.arch_value("block_count") == _GEMMA_27B_LAYERS[arch]:
        return hidden // heads
    key_length = meta.arch_value("attention.key_length")
    return key_length if isinstance(key_length, int) else hidden // heads


# ----------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Field:
    key: str | None  # the GGUF key after "{arch}." (None: the value is in no key, `in_file` derives it)
    name: str  # what it is, for the user
    built: Callable[[Any], Any]  # what transformers built, read from its config
    repair: str | None = None  # the one config field that takes the file's value, where that gives the file's model
    in_file: Callable[[GGUFMeta], Any] | None = None  # the file's value, where not the key's own
    says: str = "the file says"  # who says so, for the user

    def file_value(self, meta: GGUFMeta):
        value = self.in_file(meta) if self.in_file is not None else meta.arch_value(self.key)
        return None if isinstance(value, GGUFArray) else value  # per-layer arrays: not compared

    def label(self, arch: str | None) -> str:
        return f"{arch}.{self.key} ({self.name})" if self.key else self.name


FIELDS = (
    Field("attention.key_length", "attention head width, head_dim", _head_dim, repair="head_dim"),
    Field("attention.value_length", "value head width", _head_dim),
    Field("rope.dimension_count", "rotary dimensions per head (partial rotary)", _rotary_dims),
    Field("attention.sliding_window", "sliding-window length", _sliding_window, repair="sliding_window"),
    Field("attn_logit_softcapping", "attention soft-capping", _attr("attn_logit_softcapping"),
          repair="attn_logit_softcapping"),
    Field("final_logit_softcapping", "final logit soft-capping", _attr("final_logit_softcapping"),
          repair="final_logit_softcapping"),
    Field("rope.scaling.type", "rotary scaling", _rope_type, in_file=_file_rope_type),
    Field("rope.scaling.factor", "rotary scaling factor", _rope_factor, in_file=_file_rope_factor),
    Field("rope.scaling.attn_factor", "rotary attention factor", _rope_attn_factor),
    Field("expert_feed_forward_length", "expert MLP width", _attr("moe_intermediate_size"),
          repair="moe_intermediate_size"),
    Field("expert_shared_feed_forward_length", "shared expert MLP width", _attr("shared_expert_intermediate_size"),
          repair="shared_expert_intermediate_size"),
    Field(None, "query_pre_attn_scalar (in no GGUF file: llama.cpp takes hidden / heads for a Gemma 27B, "
          "the head width otherwise)", _attr("query_pre_attn_scalar"), in_file=_file_query_scalar,
          says="llama.cpp runs this file with"),
)


def _same(a, b) -> bool:
    numbers = [isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)]
    if all(numbers):
        return math.isclose(a, b, rel_tol=1e-6)  # GGUF keeps floats as float32: 1e-5 reads back 9.9999997e-06
    return a == b


def _as_config_value(value):
    """A float32 from the file as the number it was written from (50.0, not 50.000001)."""
    return float(f"{value:.7g}") if isinstance(value, float) else value


def check_gguf_config(source: str | os.PathLike, config, meta: GGUFMeta | None = None) -> list[str]:
    """Compare the GGUF file `source` with `config` (what transformers' reader built from it), per
    FIELDS. Each disagreement that one config field repairs is repaired in `config`, and told in the
    returned notes (also logged on the "quantkit" logger: the CLI prints them as `note:` lines); any
    other makes it a ModelLoadError naming the file, each key, the file's value and transformers'.
    """
    meta = meta if meta is not None else read_gguf_meta(source)
    arch = meta.architecture
    said = [(f, v) for f in FIELDS if (v := f.file_value(meta)) is not None]
    repaired = copy.deepcopy(config)  # nothing changes in `config` unless every field then agrees
    fixed, notes = {}, []
    for f, value in said:
        built = f.built(repaired)
        if _same(value, built) or f.repair is None or not hasattr(repaired, f.repair):
            continue
        setattr(repaired, f.repair, _as_config_value(value))
        if _same(value, f.built(repaired)):
            fixed[f.repair] = getattr(repaired, f.repair)
            notes.append(f"{Path(source).name}: {f.label(arch)} is {value!r} in the file, which transformers' GGUF "
                         f"reader does not read (it built {built!r}): repaired, config.{f.repair} = {value!r}")
        else:  # the field alone does not carry it (Qwen2's sliding window needs use_sliding_window too)
            setattr(repaired, f.repair, copy.deepcopy(getattr(config, f.repair)))
    wrong = [f"{f.label(arch)}: {f.says} {value!r}, transformers built {f.built(repaired)!r}"
             for f, value in said if not _same(value, f.built(repaired))]
    if wrong:
        raise ModelLoadError(
            f"{source}: transformers' GGUF reader builds another model than this file holds, and quantkit will not "
            f"quantize that one in its place: {'; '.join(wrong)}. Load the original safetensors checkpoint (the "
            f"Hugging Face folder this GGUF was converted from) instead")
    for name, value in fixed.items():  # all agree now: the repairs go into the caller's config
        setattr(config, name, value)
    for note in notes:
        log.warning(note)
    return notes
