"""Fuzz quantkit's readers with random mutations of valid inputs (issue 18).

    python scripts/fuzz.py recipes --count 2000 --seed 0 [--timeout 5] [--out runs/fuzz]
    python scripts/fuzz.py checkpoints --count 1000 --seed 0

A campaign mutates valid inputs and runs each mutant through a reader. A case
is fine when the reader accepts it or refuses it with a QuantkitError; any
other exception, or a case still running after --timeout seconds (a hang), is
a finding. The first few findings are written under --out/CAMPAIGN/ (the input
and a .txt with the exception) as reproducers. The table at the end counts
cases, accepted, refused (by error class), other exceptions, hangs and
seconds; the exit code is 1 when there is any finding.

Campaigns:
  recipes   the shipped recipes/*.yaml mutated as text (character flips,
            insertions of random characters and of YAML fragments, deletions,
            truncations, line swaps, indentation changes, long strings), each
            through load_recipe (from a temporary file) and build_all; an
            accepted recipe must also survive to_yaml -> from_yaml unchanged.

  checkpoints
            a small valid checkpoint (a random 2-block Llama, w4a16-rtn) with
            its config.json or model.safetensors mutated (bit flips, bytes set,
            inserted and deleted, truncations; the safetensors length prefix,
            JSON header and data section; JSON values replaced or removed),
            each through quantkit.api.load (and a forward pass) and
            quantkit.api.inspect; a checkpoint that loads must also inspect.

Another campaign is a function (rng, count) -> iterator of Case added to
CAMPAIGNS; the runner, the counting and the table are shared.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from quantkit.algorithms import build_all
from quantkit.errors import QuantkitError
from quantkit.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
KEPT = 5  # reproducers written per campaign


# --------------------------------------------------------------------------- cases and outcomes

@dataclass
class Case:
    """One input: `payload` is what gets written as its reproducer, `run` feeds it to the reader."""

    label: str  # how it was made, e.g. "w4a16-gptq: insert_fragment, truncate"
    payload: bytes
    suffix: str  # the reproducer's file extension
    run: Callable[[], object]


class Hang(BaseException):
    """Raised by the alarm; a BaseException so no `except Exception` in the reader swallows it."""


@dataclass
class Tally:
    cases: int = 0
    accepted: int = 0
    refused: Counter = field(default_factory=Counter)  # error class name -> count
    other: Counter = field(default_factory=Counter)  # exception class name -> count
    hangs: int = 0
    findings: list[tuple[Case, str, str]] = field(default_factory=list)  # (case, kind, text)


def _on_alarm(signum, frame):
    raise Hang()


def run_case(case: Case, timeout: float, tally: Tally) -> None:
    tally.cases += 1
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        case.run()
        tally.accepted += 1
    except QuantkitError as e:
        tally.refused[type(e).__name__] += 1
    except Hang:
        tally.hangs += 1
        tally.findings.append((case, "hang", f"still running after {timeout:g} s"))
    except Exception as e:  # exactly what the fuzzer looks for
        tally.other[type(e).__name__] += 1
        tally.findings.append((case, type(e).__name__, "".join(traceback.format_exception(e))))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def run_campaign(name: str, count: int, seed: int, timeout: float, out: Path) -> Tally:
    tally = Tally()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for case in CAMPAIGNS[name](random.Random(seed), count):
            run_case(case, timeout, tally)
    finally:
        signal.signal(signal.SIGALRM, previous)
    write_reproducers(name, tally.findings[:KEPT], out)
    return tally


def write_reproducers(campaign: str, findings: list[tuple[Case, str, str]], out: Path) -> None:
    folder = out / campaign
    for i, (case, kind, text) in enumerate(findings):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"case-{i:03d}{case.suffix}").write_bytes(case.payload)
        (folder / f"case-{i:03d}.txt").write_text(f"{case.label}\n{kind}\n\n{text}\n")


# --------------------------------------------------------------------------- text mutations

# YAML and regex fragments that have broken parsers before: anchors and aliases,
# python tags, flow brackets, sets, dates, nan/inf, huge numbers, huge or deep
# regexes, merge keys, complex keys, BOM, NUL, a lone surrogate (invalid UTF-8)
FRAGMENTS = [
    "&a ", "*a", "&a [1, 2]", "[*a, *a]", "!!python/object:os.system", "!!python/name:os.system ",
    "!!python/tuple [1, 2]", "[", "]", "{", "}", ":", ": ", "- ", "{{", "}}", "? ", "!!set {a, b}",
    "!!binary aGVsbG8=", "!!timestamp 2001-12-14", "2001-12-14", "2001-13-45", "2001-12-14T21:59:43.10-05:00",
    ".nan", ".inf", "-.inf", "1e400", "-1e400", "1e-400", "0", "-1", "10" * 200, "9" * 5000, "0x1F", "0o17", "1:20",
    "a{99999999999}", "(", ")", "(" * 200, "(" * 2000 + ")" * 2000, "(a+)+$", "[a-", "\\", "null", "~", "true",
    "yes", "no", "'", '"', "#", "%YAML 1.1\n---\n", "---\n", "...\n", "<<: {a: 1}", "!!int abc", "!!bool abc",
    "!!float x", "!!omap [a: 1]", "!!pairs [a: 1]", "? [a, b]\n: 1\n", "? {a: 1}\n: 2\n", "\t", "\n", "\n  ",
    "\x00", "\ufeff", "\ud800", "\x85", "é", "|\n  text\n", ">-\n", "!custom x", "%TAG !e! tag:yaml.org,2002:\n",
]
CHARS = [chr(c) for c in range(32, 127)] + list("\t\n\r\x00\x07\x1b\x7f\x85\xa0") + [
    "é", "ß", "中", "\u2028", "\ufeff", "\U0001f600", "\udcff",  # the lone surrogate: invalid UTF-8 on disk
]
VALUES = [  # what a scalar may be replaced by
    *FRAGMENTS, "[]", "{}", "[1, 2]", "{a: 1}", "[[[[[]]]]]", "-0", "1.5", "2**64", str(2**63), str(2**64),
    "nan", "inf", "W4A16", "W8A8-FP8", "rtn", "gptq", "awq", "smoothquant", "search", "channel", "tensor", "keep",
]


def flip_char(rng: random.Random, text: str) -> str:
    i = rng.randrange(len(text) + 1)
    return text[:i] + rng.choice(CHARS) + text[i + 1:]


def insert_chars(rng: random.Random, text: str) -> str:
    i = rng.randrange(len(text) + 1)
    return text[:i] + "".join(rng.choice(CHARS) for _ in range(rng.randint(1, 8))) + text[i:]


def insert_fragment(rng: random.Random, text: str) -> str:
    i = rng.randrange(len(text) + 1)
    return text[:i] + rng.choice(FRAGMENTS) + text[i:]


def replace_value(rng: random.Random, text: str) -> str:
    """A scalar after `key: ` (block or flow) replaced by a fragment or a value."""
    starts = [i + 2 for i in range(len(text) - 1) if text[i:i + 2] == ": "]
    if not starts:
        return insert_fragment(rng, text)
    i = rng.choice(starts)
    j = i
    while j < len(text) and text[j] not in ",}]\n":
        j += 1
    return text[:i] + rng.choice(VALUES) + text[j:]


def delete_span(rng: random.Random, text: str) -> str:
    i = rng.randrange(len(text) + 1)
    return text[:i] + text[i + rng.randint(1, 40):]


def truncate(rng: random.Random, text: str) -> str:
    return text[: rng.randrange(len(text) + 1)]


def swap_lines(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def duplicate_line(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    lines.insert(rng.randrange(len(lines) + 1), lines[i])
    return "\n".join(lines)


def reindent(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    lines[i] = " " * rng.choice([1, 2, 4, 40]) + lines[i] if rng.random() < 0.6 else lines[i].lstrip()
    return "\n".join(lines)


def long_string(rng: random.Random, text: str) -> str:
    i = rng.randrange(len(text) + 1)
    return text[:i] + rng.choice("x[{(-a9 ") * rng.choice([100, 10_000, 100_000]) + text[i:]


def nest(rng: random.Random, text: str) -> str:
    """Brackets nested k deep around a value: at the depth limit and past it."""
    i = rng.randrange(len(text) + 1)
    k = rng.choice([31, 32, 33, 100, 5000])
    opening, closing = rng.choice([("[", "]"), ("{a: ", "}")])
    return text[:i] + opening * k + "1" + closing * k + text[i:]


MUTATIONS = [flip_char, insert_chars, insert_fragment, replace_value, replace_value, delete_span, truncate,
             swap_lines, duplicate_line, reindent, long_string, nest]


def mutate(rng: random.Random, text: str) -> tuple[str, list[str]]:
    """`text` after one to four random mutations, and their names."""
    names = []
    for _ in range(rng.choice([1, 1, 2, 3, 4])):
        op = rng.choice(MUTATIONS)
        text = op(rng, text)
        names.append(op.__name__)
    return text, names


# --------------------------------------------------------------------------- campaign: recipes

LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj", "lm_head"]


def check_recipe_file(path: Path) -> None:
    """What quantkit does with a recipe before loading a model: parse, build the
    algorithms, plan layers; an accepted recipe must round-trip through YAML."""
    recipe = load_recipe(path)
    build_all(recipe)
    for layer in LAYERS:
        recipe.spec_for(layer, 576)
    again = Recipe.from_yaml(recipe.to_yaml())
    if again != recipe:
        raise AssertionError(f"round trip changed the recipe:\n{recipe}\n{again}")


def recipe_cases(rng: random.Random, count: int) -> Iterator[Case]:
    sources = sorted((REPO / "recipes").glob("*.yaml"))
    texts = [(p.stem, p.read_text(encoding="utf-8")) for p in sources]
    with tempfile.TemporaryDirectory(prefix="quantkit-fuzz-") as tmp:
        for i in range(count):
            stem, text = rng.choice(texts)
            mutant, ops = mutate(rng, text)
            payload = mutant.encode("utf-8", "surrogatepass")  # a lone surrogate makes invalid UTF-8
            path = Path(tmp) / f"{stem}-{i}.yaml"
            path.write_bytes(payload)
            yield Case(f"{stem}: {', '.join(ops)}", payload, ".yaml", lambda path=path: check_recipe_file(path))
            path.unlink()


# --------------------------------------------------------------------------- checkpoint mutations
#
# Operators (bytes, random.Random) -> bytes on config.json and model.safetensors; the
# checkpoint campaign below and tests/test_fuzz_checkpoints.py both use them.

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


def truncate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Cut the data at a random length (possibly 0)."""
    return data[: rng.randint(0, max(len(data) - 1, 0))]


BYTE_MUTATIONS = (flip_bits, set_bytes, insert_bytes, delete_bytes, truncate_bytes)


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
                         safetensors_header_json, safetensors_data_section, truncate_bytes)


def mutate_checkpoint_file(folder: Path, file: str, seed: int, rounds: int) -> list[str]:
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


# --------------------------------------------------------------------------- campaign: checkpoints

def _tiny_checkpoint(folder: Path) -> Path:
    """A 2-block random Llama with a word-level tokenizer, quantized with w4a16-rtn: a
    small valid checkpoint of every tensor kind the reader checks (packed weights,
    scales, shapes, norms, tied embeddings)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from quantkit import api

    words = ["<eos>", "<unk>"] + sorted(set("the of and to a in was her it i that he not be his as had with for you she".split()))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=0)
    torch.manual_seed(0)
    model_dir = folder / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = Recipe.from_dict({"name": "fuzz-w4", "weights": {"group_size": 32}, "check": {"windows": 0}})
    api.quantize(model_dir, recipe, folder / "ckpt", show_progress=False)
    return folder / "ckpt"


def check_checkpoint(folder: Path) -> None:
    """What eval and inspect do with a checkpoint: load it (and run it), inspect it. Each
    call must succeed or raise a QuantkitError; a checkpoint that loads must also inspect.
    The first refusal is raised again, so the case counts as refused."""
    from quantkit import api

    refusal = None
    try:
        loaded = api.load(folder)
        with torch.inference_mode():
            loaded.model(torch.tensor([[1, 2, 3, 4]]))
    except QuantkitError as e:
        refusal = e
    try:
        api.inspect(folder)
    except QuantkitError as e:
        if refusal is None:
            raise AssertionError(f"loads but inspect refuses it: {e}") from e
    if refusal is not None:
        raise refusal


def checkpoint_cases(rng: random.Random, count: int) -> Iterator[Case]:
    with tempfile.TemporaryDirectory(prefix="quantkit-fuzz-") as tmp:
        valid = _tiny_checkpoint(Path(tmp))
        folder = Path(tmp) / "case"
        for _ in range(count):
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(valid, folder)
            file = rng.choice(["config.json", "model.safetensors"])
            ops = mutate_checkpoint_file(folder, file, rng.randrange(2**32), rng.randint(1, 3))
            yield Case(f"{file}: {', '.join(ops)}", (folder / file).read_bytes(), Path(file).suffix,
                       lambda: check_checkpoint(folder))


CAMPAIGNS: dict[str, Callable[[random.Random, int], Iterator[Case]]] = {
    "recipes": recipe_cases,
    "checkpoints": checkpoint_cases,
}


# --------------------------------------------------------------------------- report

def report(name: str, tally: Tally, seconds: float, out: Path, console: Console) -> None:
    table = Table(title=f"fuzz campaign {name!r}", show_header=False)
    table.add_row("cases", str(tally.cases))
    table.add_row("accepted", str(tally.accepted))
    table.add_row("refused (quantkit errors)", str(sum(tally.refused.values())))
    for cls, n in tally.refused.most_common():
        table.add_row(f"  {cls}", str(n))
    table.add_row("other exceptions", str(sum(tally.other.values())), style="red" if tally.other else None)
    for cls, n in tally.other.most_common():
        table.add_row(f"  {cls}", str(n))
    table.add_row("hangs", str(tally.hangs), style="red" if tally.hangs else None)
    table.add_row("seconds", f"{seconds:.1f}")
    console.print(table)
    for i, (case, kind, text) in enumerate(tally.findings[:KEPT]):
        last = text.strip().splitlines()[-1] if text.strip() else kind
        console.print(f"[red]{escape(kind)}[/] {escape(case.label)}: {escape(last[:200])}", highlight=False)
        console.print(f"  reproducer: {out / name / f'case-{i:03d}{case.suffix}'}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("campaign", choices=sorted(CAMPAIGNS))
    parser.add_argument("--count", type=int, default=2000, help="cases to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds before a case counts as a hang")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "fuzz", help="where reproducers go")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    tally = run_campaign(args.campaign, args.count, args.seed, args.timeout, args.out)
    report(args.campaign, tally, time.perf_counter() - start, args.out, Console())
    return 1 if tally.other or tally.hangs else 0


if __name__ == "__main__":
    sys.exit(main())
