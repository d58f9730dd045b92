"""Fuzzing the checkpoint reader: a corrupted checkpoint loads, or raises a QuantkitError.

Starting from a valid checkpoint (the tiny Llama quantized with w4a16-rtn),
each example applies a few random mutations to config.json or to
model.safetensors (its length prefix, its JSON header, its data section) in a
fresh copy, then calls quantkit.api.load (and runs the model when it loads)
and quantkit.api.inspect. Anything but success or a QuantkitError fails the
test, as does an example that runs past the deadline.

The mutation operators are plain functions (bytes, random.Random) -> bytes,
at the top of this file so that a script can reuse them (CONFIG_MUTATIONS,
SAFETENSORS_MUTATIONS). QUANTKIT_FUZZ_EXAMPLES sets the number of examples
(default 300, about 3 s; deterministic: derandomize=True).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import api
from quantkit.errors import QuantkitError

# --------------------------------------------------------------------------- mutation operators

# bytes that change the meaning of JSON or of a little-endian integer the most
INTERESTING = b'\x00\xff\x7f\x80"{}[],:-.0123456789eEtn \\'


def flip_bits(data: bytes, rng: random.Random) -> bytes:
    """Flip 1 to 4 random bits."""
    if not data:
        return data
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def set_bytes(data: bytes, rng: random.Random) -> bytes:
    """Overwrite 1 to 4 random bytes, mostly with bytes that matter to JSON."""
    if not data:
        return data
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] = rng.choice(INTERESTING) if rng.random() < 0.7 else rng.randrange(256)
    return bytes(out)


def insert_bytes(data: bytes, rng: random.Random) -> bytes:
    """Insert 1 to 8 bytes at a random place."""
    i = rng.randint(0, len(data))
    new = bytes(rng.choice(INTERESTING) for _ in range(rng.randint(1, 8)))
    return data[:i] + new + data[i:]


def delete_bytes(data: bytes, rng: random.Random) -> bytes:
    """Delete a span of 1 to 16 bytes."""
    if not data:
        return data
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.randint(1, 16):]


def truncate(data: bytes, rng: random.Random) -> bytes:
    """Cut the data at a random length (possibly 0)."""
    return data[: rng.randint(0, max(len(data) - 1, 0))]


BYTE_MUTATIONS = (flip_bits, set_bytes, insert_bytes, delete_bytes, truncate)


def _random_json(rng: random.Random) -> object:
    """A JSON value likely to be of the wrong type or out of range wherever it lands."""
    return rng.choice([None, True, False, 0, -1, 1, 3, 7, 2**31, 2**63, 10**30, 1e-300, -0.5, 1.5, float("inf"),
                       "", "4", "Linear", "lm_head", "re:(", "silu", "float16", [], [1], ["x", 2], {}, {"a": 1}])


def _nodes(value: object, path: tuple = ()) -> list[tuple]:
    found = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _nodes(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _nodes(v, path + (i,))
    return found


def json_value(data: bytes, rng: random.Random) -> bytes:
    """Parse the data as JSON; replace one value (or delete one key, or drop one list item)
    anywhere in it, then write it back. Not JSON: overwrite bytes instead."""
    try:
        doc = json.loads(data)
    except ValueError:
        return set_bytes(data, rng)
    path = rng.choice(_nodes(doc))
    if not path:
        return json.dumps(_random_json(rng)).encode()
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    if rng.random() < 0.25:
        del parent[path[-1]]
    else:
        parent[path[-1]] = _random_json(rng)
    return json.dumps(doc, indent=2).encode()


def _split_safetensors(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(length prefix, JSON header, data section) of a safetensors file, as well as it parses."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    end = 8 + n if 8 + n <= len(data) else len(data)
    return data[:8], data[8:end], data[end:]


def safetensors_header_bytes(data: bytes, rng: random.Random) -> bytes:
    """A byte-level mutation of the JSON header; the length prefix is kept, or (half the time)
    fixed to the new header's length."""
    prefix, header, rest = _split_safetensors(data)
    header = rng.choice(BYTE_MUTATIONS)(header, rng)
    if rng.random() < 0.5:
        prefix = len(header).to_bytes(8, "little")
    return prefix + header + rest


def safetensors_length_prefix(data: bytes, rng: random.Random) -> bytes:
    """Rewrite the 8-byte little-endian header length: off by a little, zero, huge, or random."""
    prefix, header, rest = _split_safetensors(data)
    n = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
    new = rng.choice([n + rng.randint(-8, 8), 0, 1, 2**63 - 1, 2**64 - 1, rng.randrange(2**64), len(data)])
    return (new % 2**64).to_bytes(8, "little") + header + rest


RENAMES = (("layers.0.", "layers.7."), ("layers.1.", "layers.2."), (".weight_scale", ".weight_zero_point"),
           (".weight_packed", ".weight"), (".weight_shape", ".weight_g_idx"), (".weight_scale", ".input_scale"),
           ("norm.weight", "norm.bias"), ("embed_tokens", "lm_head"), ("q_proj", "k_proj"))


def safetensors_header_json(data: bytes, rng: random.Random) -> bytes:
    """A structural change of the header that keeps it valid JSON with the right length: a tensor's
    dtype, shape or offsets, its name, or the metadata."""
    prefix, header, rest = _split_safetensors(data)
    try:
        doc = json.loads(header)
        keys = [k for k in doc if k != "__metadata__"]
        key = rng.choice(keys)
        entry = doc[key]
    except (ValueError, IndexError, TypeError):
        return safetensors_header_bytes(data, rng)
    kind = rng.randrange(6)
    if kind == 0:  # same element size, other meaning
        entry["dtype"] = rng.choice(["F32", "I32", "F16", "BF16", "I16", "I64", "F64", "U8", "I8", "F8_E4M3", "BOOL"])
    elif kind == 1 and entry.get("shape"):  # same element count, other layout
        shape = entry["shape"]
        entry["shape"] = shape[::-1] if rng.random() < 0.5 else [math.prod(shape)]
    elif kind == 2:
        entry["shape"] = [rng.choice([0, 1, 2, 3, 96, 2**40])] * rng.randint(0, 3)
    elif kind == 3:
        entry["data_offsets"] = [o + rng.randint(-8, 8) for o in entry["data_offsets"]]
    elif kind == 4:  # a plausible other name: another block, another part of a layout, a typo
        names = [key.replace(a, b) for a, b in RENAMES if a in key] + [key + "x"]
        doc[rng.choice(names)] = doc.pop(key)
    else:
        doc["__metadata__"] = _random_json(rng) if rng.random() < 0.5 else {"format": "pt", "x": "y"}
    new = json.dumps(doc).encode()
    new += b" " * (-len(new) % 8)
    return len(new).to_bytes(8, "little") + new + rest


def safetensors_data_section(data: bytes, rng: random.Random) -> bytes:
    """Flip or overwrite bytes of the tensor data (the header stays intact)."""
    prefix, header, rest = _split_safetensors(data)
    if not rest:
        return data
    rest = rng.choice([flip_bits, set_bytes])(rest, rng)
    return prefix + header + rest


CONFIG_MUTATIONS = (*BYTE_MUTATIONS, json_value, json_value, json_value)  # mostly still JSON
SAFETENSORS_MUTATIONS = (safetensors_header_bytes, safetensors_length_prefix, safetensors_header_json,
                         safetensors_header_json, safetensors_data_section, truncate)


def mutate(folder: Path, file: str, seed: int, rounds: int) -> list[str]:
    """Apply `rounds` mutations (chosen by `seed`) to folder/file; return their names."""
    rng = random.Random(seed)
    ops = CONFIG_MUTATIONS if file == "config.json" else SAFETENSORS_MUTATIONS
    data, applied = (folder / file).read_bytes(), []
    for _ in range(rounds):
        op = rng.choice(ops)
        data = op(data, rng)
        applied.append(op.__name__)
    (folder / file).write_bytes(data)
    return applied


# --------------------------------------------------------------------------- the property

EXAMPLES = int(os.environ.get("QUANTKIT_FUZZ_EXAMPLES", "300"))
HANG_S = 60  # an example still running after this is a hang: fail it instead of waiting forever


class Hang(Exception):
    """An example ran past HANG_S."""


def _on_alarm(signum, frame):
    raise Hang(f"no answer after {HANG_S} s")


def check(folder: Path) -> dict[str, str]:
    """api.load (and a forward pass when it loads) and api.inspect on `folder`: 'ok' or the name of
    the QuantkitError each raised; any other exception propagates."""
    outcome = {}
    try:
        loaded = api.load(folder)
        with torch.inference_mode():
            loaded.model(torch.tensor([[1, 2, 3, 4]]))
        outcome["load"] = "ok"
    except QuantkitError as e:
        outcome["load"] = type(e).__name__
    try:
        api.inspect(folder)
        outcome["inspect"] = "ok"
    except QuantkitError as e:
        outcome["inspect"] = type(e).__name__
    return outcome


@pytest.fixture(scope="module")
def valid_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "ckpt"
    api.quantize(tiny_model_dir, "w4a16-rtn", out, show_progress=False)
    assert check(out) == {"load": "ok", "inspect": "ok"}  # and warms up the imports
    return out


@settings(max_examples=EXAMPLES, deadline=timedelta(seconds=5), derandomize=True, database=None)
@given(file=st.sampled_from(["config.json", "model.safetensors"]), seed=st.integers(0, 2**32 - 1),
       rounds=st.integers(1, 3))
def test_a_corrupted_checkpoint_loads_or_raises_a_quantkit_error(valid_checkpoint, file, seed, rounds):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        shutil.copytree(valid_checkpoint, folder)
        mutate(folder, file, seed, rounds)
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(HANG_S)
        try:
            outcome = check(folder)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    # inspect validates what load does (no tensor data): a checkpoint that loads also inspects
    assert outcome["load"] != "ok" or outcome["inspect"] == "ok", outcome
