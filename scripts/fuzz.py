"""Fuzz quantkit's readers with random mutations of valid inputs (issue 18).

    python scripts/fuzz.py recipes --count 2000 --seed 0 [--timeout 5] [--out runs/fuzz]

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

Another campaign is a function (rng, count) -> iterator of Case added to
CAMPAIGNS; the runner, the counting and the table are shared.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
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


CAMPAIGNS: dict[str, Callable[[random.Random, int], Iterator[Case]]] = {
    "recipes": recipe_cases,
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
        console.print(f"[red]{kind}[/] {case.label}: {last[:200]}", highlight=False)
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
