"""Calibration and evaluation text: bundled corpora, local files, hub datasets, and mixes of them.

A *source* names some text. It is one of

* a bundled dataset name (``calibration/datasets.json``): ``"mix"`` (the
  default calibration data: equal shares of literature, technical
  documentation, source code and dialogue), its parts ``"austen"``,
  ``"gitdocs"``, ``"pycode"`` and ``"dialogue"``, and the held-out evaluation
  texts ``"austen-eval"``, ``"pydocs-eval"`` and ``"kjv-eval"`` (never
  calibrate on them);
* a local file: ``.txt`` (the whole file is one document), ``.jsonl`` /
  ``.json`` / ``.parquet`` / ``.csv`` (one document per row, read from
  ``text_column`` with the ``datasets`` library; a row with a ``messages``
  column of ``{"role", "content"}`` turns and no text column is a conversation);
* a local folder: every such file under it, in sorted path order;
* a Hugging Face hub dataset ``"name"`` or ``"name:config"`` (needs a hub).

A *mix* samples several sources in stated shares: ``"austen@0.5,./notes.txt@0.3,dialogue@0.2"``
(``SOURCE@WEIGHT`` items joined by commas; a missing weight is 1; weights are
normalized). Each part gives its share of the calibration windows, drawn from
its own token stream with its own seed, so a one-part mix equals its source.

Conversations are written with the tokenizer's chat template where it has one
(``chat_template="auto"``; ``True`` requires one, ``False`` joins the turns as
plain lines), as a chat model sees them when served, and their calibration
windows start where a conversation starts. Plain text is never wrapped in a
template. Token streams join the documents with ``"\\n\\n"`` (rendered
conversations back to back) and add no special tokens of their own.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
from pathlib import Path

import torch

from quantkit.resources import calibration_dir

__all__ = [
    "BUNDLED_DIR",
    "DEFAULT_CALIBRATION",
    "DEFAULT_EVALUATION",
    "EVALUATION_TEXTS",
    "SECOND_EVALUATION",
    "THIRD_EVALUATION",
    "Part",
    "bundled_datasets",
    "calibration_batch",
    "calibration_parts",
    "evaluation_tokens",
    "held_out_batch",
    "load_documents",
    "load_texts",
    "parse_mix",
]

DEFAULT_CALIBRATION = "mix"
DEFAULT_EVALUATION = "austen-eval"
SECOND_EVALUATION = "pydocs-eval"
THIRD_EVALUATION = "kjv-eval"  # a domain that no bundled calibration text contains
EVALUATION_TEXTS = (DEFAULT_EVALUATION, SECOND_EVALUATION, THIRD_EVALUATION)

DOC_SEPARATOR = "\n\n"
MIX_SEPARATOR, WEIGHT_MARK = ",", "@"
# file suffix -> builder of datasets.load_dataset; .txt is read directly (one document per file)
_TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SUFFIXES = (".txt", *_TABLE_BUILDERS)
MESSAGES_COLUMN = "messages"  # a conversation: [{"role": ..., "content": ...}, ...]

Conversation = list  # [{"role": str, "content": str}, ...]


BUNDLED_DIR: Path = calibration_dir()  # quantkit.resources: package data, or calibration/ in a checkout


@functools.cache
def _read_datasets_json() -> dict[str, dict]:
    path = BUNDLED_DIR / "datasets.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled dataset index {path} not found; rebuild it with scripts/build_corpus.py"
        )
    return json.loads(path.read_text("utf-8"))


def bundled_datasets() -> dict[str, dict]:
    """Bundled dataset name -> {"file", "role", "description", "source", "chars", "sha256"}
    (a mix: {"mix": {part: weight}, "role", "description", "source"} and no file)."""
    return {name: dict(entry) for name, entry in _read_datasets_json().items()}


# ------------------------------------------------------------------ mixes


@dataclasses.dataclass(frozen=True)
class Part:
    source: str
    share: float  # of the calibration windows; the shares of a mix sum to 1


def parse_mix(spec: str) -> list[Part]:
    """The parts of a calibration source: a bundled mix's, those of a
    ``SOURCE@WEIGHT,...`` spec, or the source alone (share 1).

    Checks the spelling only (weights, empty or repeated parts, a mix inside a
    mix); whether each part exists is found when its text is read. An existing
    file or folder is one source even if its name holds a comma or an ``@``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"calibration data must name a corpus, a path, a dataset or a mix, got {spec!r}")
    bundled = bundled_datasets()
    if spec in bundled and "mix" in bundled[spec]:
        items = [(str(k), float(v)) for k, v in bundled[spec]["mix"].items()]
    elif (MIX_SEPARATOR not in spec and WEIGHT_MARK not in spec) or Path(spec).expanduser().exists():
        return [Part(spec, 1.0)]
    else:
        items = [_mix_item(item.strip(), spec) for item in spec.split(MIX_SEPARATOR)]
    names = [s for s, _ in items]
    for s in names:
        if s in bundled and "mix" in bundled[s]:
            raise ValueError(f"calibration mix {spec!r}: {s!r} is itself a mix; list its parts instead "
                             f"({', '.join(f'{k}@{v:g}' for k, v in bundled[s]['mix'].items())})")
    repeated = sorted({s for s in names if names.count(s) > 1})
    if repeated:
        raise ValueError(f"calibration mix {spec!r} names {repeated[0]!r} twice; give it one weight")
    total = sum(w for _, w in items)
    return [Part(s, w / total) for s, w in items]


def _mix_item(item: str, spec: str) -> tuple[str, float]:
    source, mark, weight = item.rpartition(WEIGHT_MARK) if WEIGHT_MARK in item else (item, "", "1")
    how = f"calibration mix {spec!r}: write it as SOURCE@WEIGHT items joined by commas, e.g. 'austen@0.5,./notes.txt@0.5'"
    if not source.strip():
        raise ValueError(f"{how} (an item names no source: {item!r})")
    try:
        w = float(weight)
    except ValueError:
        raise ValueError(f"{how} (the weight of {source.strip()!r} is {weight!r}, not a number)") from None
    if not math.isfinite(w) or w <= 0:
        raise ValueError(f"{how} (the weight of {source.strip()!r} must be a positive number, got {weight!r})")
    return source.strip(), w


def split_counts(total: int, shares: list[float]) -> list[int]:
    """``total`` split in proportion to ``shares`` (largest remainder; ties to the earlier part)."""
    exact = [total * s for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


# ------------------------------------------------------------- documents


def _read_txt(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from e


def _conversation(value, what: str) -> Conversation:
    """A checked list of {"role", "content"} turns."""
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not ok:
        raise ValueError(f"{what}: column {MESSAGES_COLUMN!r} must hold a list of {{'role': str, 'content': str}} "
                         f"turns, got {str(value)[:120]}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _row_document(row: dict, text_column: str, what: str, i: int):
    """One table row as a document: its text, or its conversation where it has
    messages and no text column; None for an empty text."""
    if text_column in row:
        value = row[text_column]
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{what}: column {text_column!r} holds {type(value).__name__}, not text (row {i})")
        return value
    if MESSAGES_COLUMN in row:
        return _conversation(row[MESSAGES_COLUMN], f"{what} (row {i})")
    raise ValueError(f"{what} has no column {text_column!r}; its columns are {sorted(row)} "
                     f"(choose one with text_column=..., or give conversations a {MESSAGES_COLUMN!r} column)")


def _table_documents(builder: str, files: list[Path], text_column: str, what: str) -> list:
    import datasets

    # streaming: rows are read from the files as they are; no Arrow cache is written
    ds = datasets.load_dataset(
        builder, data_files=[str(f) for f in files], split="train", streaming=True
    )
    docs = (_row_document(row, text_column, what, i) for i, row in enumerate(ds))
    return [d for d in docs if d is not None]


def _local_documents(path: Path, text_column: str) -> list:
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in _SUFFIXES and not p.name.startswith(".")
        )  # fmt: skip
        if not files:
            raise FileNotFoundError(
                f"folder {path} holds no text files (looked for {', '.join(_SUFFIXES)})"
            )
    else:
        if path.suffix.lower() not in _SUFFIXES:
            raise ValueError(
                f"cannot read {path}: unknown file type {path.suffix!r} "
                f"(supported: {', '.join(_SUFFIXES)})"
            )
        files = [path]

    docs: list = []
    for f in files:  # one file at a time keeps folder order = sorted path order
        suffix = f.suffix.lower()
        if suffix == ".txt":
            docs.append(_read_txt(f))
        else:
            docs.extend(_table_documents(_TABLE_BUILDERS[suffix], [f], text_column, str(f)))
    return docs


def _hub_documents(source: str, split: str, text_column: str) -> list:
    import datasets

    name, _, config = source.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # no hub, unknown name, bad config/split: say what was tried
        raise ValueError(
            f"{source!r} is not a bundled dataset ({', '.join(bundled_datasets())}), "
            f"not an existing file or folder, and could not be loaded from the Hugging Face "
            f"hub ({type(e).__name__}: {e})"
        ) from e
    if text_column not in ds.column_names and MESSAGES_COLUMN in ds.column_names:
        what = f"hub dataset {source!r} (split {split!r})"
        return [_conversation(m, f"{what} (row {i})") for i, m in enumerate(ds[MESSAGES_COLUMN])]
    if text_column not in ds.column_names:
        raise ValueError(
            f"hub dataset {source!r} (split {split!r}) has no column {text_column!r}; "
            f"its columns are {ds.column_names} (choose one with text_column=...)"
        )
    return [t for t in ds[text_column] if t]


def _bundled_documents(name: str, entry: dict) -> list:
    if "mix" in entry:
        raise ValueError(f"{name!r} is a calibration mix of {', '.join(entry['mix'])}, not one text; "
                         f"name one of them to read or evaluate it")
    path = BUNDLED_DIR / entry["file"]
    if entry.get("format") != "conversations":
        return [_read_txt(path)]
    lines = _read_txt(path).splitlines()
    return [_conversation(json.loads(line)[MESSAGES_COLUMN], f"{path} (line {i + 1})")
            for i, line in enumerate(lines) if line.strip()]


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or Path(source).suffix.lower() in _SUFFIXES
    )


def load_documents(source: str, split: str = "train", text_column: str = "text") -> list:
    """The documents of one ``source`` (see the module docstring), in order:
    each a string, or a conversation (a list of {"role", "content"} turns).

    ``split`` applies to hub datasets only; local table files are read whole.
    Raises FileNotFoundError for a missing path and ValueError for an unknown
    name, an unreadable file or a missing ``text_column`` (listing the columns).
    """
    bundled = bundled_datasets()
    if source in bundled:
        return _bundled_documents(source, bundled[source])

    path = Path(source).expanduser()
    if path.exists():
        docs = _local_documents(path, text_column)
        if not any(docs):
            raise ValueError(f"{source!r} holds no text")
        return docs

    names = ", ".join(bundled)
    if _looks_like_path(source):
        raise FileNotFoundError(f"no such file or folder: {source!r} (bundled datasets: {names})")
    close = difflib.get_close_matches(source, list(bundled), n=1, cutoff=0.8)
    if close and "/" not in source:  # a typo of a bundled name: do not wait on the hub
        raise ValueError(
            f"unknown dataset {source!r}; did you mean {close[0]!r}? (bundled datasets: {names})"
        )
    return _hub_documents(source, split, text_column)


def _plain(doc) -> str:
    return doc if isinstance(doc, str) else "\n".join(m["content"] for m in doc)


def load_texts(source: str, split: str = "train", text_column: str = "text") -> list[str]:
    """load_documents with each conversation's turns joined as plain lines."""
    return [_plain(d) for d in load_documents(source, split, text_column)]


def _uses_template(tokenizer, chat_template, source: str, conversational: bool) -> bool:
    """Whether the conversations of `source` are written with the tokenizer's chat template."""
    if not conversational or chat_template is False:
        return False
    if getattr(tokenizer, "chat_template", None):
        return True
    if chat_template is True:
        raise ValueError(f"{source!r} holds conversations and chat_template is true, but the tokenizer has no "
                         f"chat template (set chat_template: auto or false to calibrate on the turns as plain text)")
    return False


# ---------------------------------------------------------- token streams


@dataclasses.dataclass(frozen=True)
class _Stream:
    ids: torch.Tensor  # [T] int64
    doc_starts: torch.Tensor | None  # [D] where each conversation starts; None for plain text
    chat: bool  # conversations written with the chat template


_STREAMS: dict[tuple, tuple[object, _Stream]] = {}  # (id(tokenizer), source, chat_template) -> (tokenizer, stream)


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    # verbose=False: a stream longer than model_max_length is intended here
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _token_stream(tokenizer, source: str, chat_template="auto") -> _Stream:
    """The documents of ``source`` as one token stream, tokenized once.

    Plain text is joined by DOC_SEPARATOR and tokenized whole. Conversations
    are rendered one by one (the chat template, or plain lines) and their
    token offsets kept. The last few streams are kept (a corpus of several MB
    takes seconds to tokenize); the entry holds the tokenizer itself, so an id
    is never reused.
    """
    key = (id(tokenizer), source, chat_template)
    hit = _STREAMS.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    docs = load_documents(source)
    conversational = any(not isinstance(d, str) for d in docs)
    chat = _uses_template(tokenizer, chat_template, source, conversational)
    if not conversational:
        stream = _Stream(torch.tensor(_tokenize(tokenizer, [DOC_SEPARATOR.join(docs)])[0], dtype=torch.long), None, False)
    else:
        if chat:
            texts = [d if isinstance(d, str) else tokenizer.apply_chat_template(d, tokenize=False) for d in docs]
        else:
            texts = [_plain(d) + (DOC_SEPARATOR if i + 1 < len(docs) else "") for i, d in enumerate(docs)]
        pieces = _tokenize(tokenizer, texts)
        lengths = torch.tensor([len(p) for p in pieces], dtype=torch.long)
        starts = torch.cumsum(lengths, 0) - lengths
        stream = _Stream(torch.tensor([t for p in pieces for t in p], dtype=torch.long), starts[lengths > 0], chat)
    if len(_STREAMS) >= 8:
        _STREAMS.pop(next(iter(_STREAMS)))
    _STREAMS[key] = (tokenizer, stream)
    return stream


def evaluation_tokens(tokenizer, source: str, chat_template="auto") -> torch.Tensor:
    """[T] int64: the whole token stream of ``source``, no special tokens added
    (conversations written as calibration writes them)."""
    if len(parse_mix(source)) > 1:
        raise ValueError(f"{source!r} is a calibration mix; evaluate on one text at a time")
    return _token_stream(tokenizer, source, chat_template).ids.clone()  # the cached stream stays untouched


def _calibration_starts(stream: _Stream, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """[num_samples] seeded window starts: anywhere in plain text; at a conversation's start in conversations."""
    T = stream.ids.numel()
    gen = torch.Generator().manual_seed(seed)
    if stream.doc_starts is not None:
        starts = stream.doc_starts[stream.doc_starts < T - seqlen]
        if starts.numel():
            return starts[torch.randint(0, starts.numel(), (num_samples,), generator=gen)]
    return torch.randint(0, T - seqlen, (num_samples,), generator=gen)  # [N]


def _check_window_args(num_samples, seqlen) -> None:
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not isinstance(seqlen, int) or seqlen <= 0:
        raise ValueError(f"seqlen must be a positive integer, got {seqlen!r}")


def _stream_for_windows(tokenizer, source: str, seqlen: int, chat_template) -> _Stream:
    stream = _token_stream(tokenizer, source, chat_template)
    if stream.ids.numel() < seqlen + 1:
        raise ValueError(
            f"{source!r} has {stream.ids.numel()} tokens; a window of seqlen={seqlen} needs at least {seqlen + 1}"
        )
    return stream


def calibration_parts(tokenizer, source: str, num_samples: int, chat_template="auto") -> list[dict]:
    """What each part of ``source`` gives a calibration batch of ``num_samples``:
    [{"source", "share", "samples", "chat_template"}] (for the report)."""
    parts = parse_mix(source)
    counts = split_counts(num_samples, [p.share for p in parts])
    return [{"source": p.source, "share": p.share, "samples": n,
             "chat_template": n > 0 and _token_stream(tokenizer, p.source, chat_template).chat}
            for p, n in zip(parts, counts)]


def calibration_batch(
    tokenizer, source: str, num_samples: int, seqlen: int, seed: int = 0, chat_template="auto"
) -> torch.Tensor:
    """[num_samples, seqlen] int64: windows of the token stream at seeded random offsets.

    Offsets are drawn uniformly (with replacement) from [0, T - seqlen - 1], so
    each window is followed by at least one more token of the stream (in
    conversations: from the conversations' starts). A mix gives each part its
    share of the windows (largest remainder), part i drawn with seed + i, in
    the mix's order. The same (source, tokenizer, num_samples, seqlen, seed)
    always gives the same batch.
    """
    _check_window_args(num_samples, seqlen)
    parts = parse_mix(source)
    rows = []
    for i, (part, n) in enumerate(zip(parts, split_counts(num_samples, [p.share for p in parts]))):
        if n:
            stream = _stream_for_windows(tokenizer, part.source, seqlen, chat_template)
            starts = _calibration_starts(stream, n, seqlen, seed + i)
            rows.append(stream.ids[starts[:, None] + torch.arange(seqlen)[None, :]])  # [n, seqlen]
    return torch.cat(rows)


def held_out_batch(
    tokenizer, source: str, windows: int, seqlen: int, seed: int = 0, calibration: tuple[int, int] | None = None,
    chat_template="auto",
) -> tuple[torch.Tensor, bool]:
    """([windows, seqlen] int64, disjoint): windows of ``source`` for checking the
    quantized model on text it was not fitted to.

    calibration (num_samples, calib_seqlen): the calibration batch drawn from the
    same source with the same seed; the windows then overlap neither it nor each
    other, drawn at seeded random offsets of its token stream. Where the text is
    too short for that they are drawn like calibration windows and `disjoint` is
    False (said in the report). calibration None (nothing is calibrated, e.g.
    round-to-nearest): any window is held back, so only a few pieces of plain
    text around seeded random offsets are tokenized, not the whole stream.
    A mix: each part gives its share of the windows, away from its own share
    of the calibration windows.
    """
    _check_window_args(windows, seqlen)
    parts = parse_mix(source)
    shares = [p.share for p in parts]
    calib_counts = split_counts(calibration[0], shares) if calibration is not None else [None] * len(parts)
    rows, disjoint = [], True
    for i, (part, n, nc) in enumerate(zip(parts, split_counts(windows, shares), calib_counts)):
        if n:
            calib = None if calibration is None else (nc, calibration[1])
            ids, ok = _held_out_one(tokenizer, part.source, n, seqlen, seed + i, calib, chat_template)
            rows.append(ids)
            disjoint = disjoint and ok
    return torch.cat(rows), disjoint


def _is_conversational(source: str) -> bool:
    """Whether `source` holds conversations: a bundled entry says so without reading its file."""
    entry = bundled_datasets().get(source)
    if entry is not None and "file" in entry:
        return entry.get("format") == "conversations"
    return any(not isinstance(d, str) for d in load_documents(source))


def _held_out_one(tokenizer, source, windows, seqlen, seed, calibration, chat_template) -> tuple[torch.Tensor, bool]:
    if calibration is None and not _is_conversational(source):
        return _windows_from_pieces(tokenizer, source, windows, seqlen, seed), True
    stream = _stream_for_windows(tokenizer, source, seqlen, chat_template)
    ids, T = stream.ids, stream.ids.numel()
    taken = torch.zeros(T + seqlen, dtype=torch.bool)  # positions some window already covers
    if calibration is not None:
        num_samples, calib_seqlen = calibration
        if T > calib_seqlen and num_samples:
            for s in _calibration_starts(stream, num_samples, calib_seqlen, seed).tolist():
                taken[s : s + calib_seqlen] = True
    gen = torch.Generator().manual_seed(seed + 7919)  # not the calibration draw's stream
    starts: list[int] = []
    for candidate in torch.randint(0, T - seqlen, (64 * windows,), generator=gen).tolist():
        if not taken[candidate : candidate + seqlen].any():
            starts.append(candidate)
            taken[candidate : candidate + seqlen] = True
            if len(starts) == windows:
                break
    disjoint = len(starts) == windows
    if not disjoint:
        starts = torch.randint(0, T - seqlen, (windows,), generator=gen).tolist()
    return ids[torch.tensor(starts)[:, None] + torch.arange(seqlen)[None, :]], disjoint


def _windows_from_pieces(tokenizer, source: str, windows: int, seqlen: int, seed: int) -> torch.Tensor:
    """[windows, seqlen]: each window from a piece of the joined text at a seeded
    random character offset, tokenized alone (its first token, maybe half a word,
    dropped); pieces grow until they hold enough tokens. Tokenizing a corpus of
    several MB whole takes seconds; these pieces take milliseconds."""
    text = DOC_SEPARATOR.join(load_texts(source))
    gen = torch.Generator().manual_seed(seed + 7919)
    rows = []
    for _ in range(windows):
        chars = 8 * (seqlen + 1)
        while True:
            start = int(torch.randint(0, max(1, len(text) - chars), (1,), generator=gen))
            ids = tokenizer(text[start : start + chars], add_special_tokens=False, return_attention_mask=False,
                            verbose=False)["input_ids"][1:]
            if len(ids) >= seqlen:
                rows.append(ids[:seqlen])
                break
            if chars >= len(text):
                raise ValueError(f"{source!r} has fewer than {seqlen + 1} tokens: too short for a window of "
                                 f"{seqlen} (choose a shorter seqlen)")
            chars *= 2
    return torch.tensor(rows, dtype=torch.long)
