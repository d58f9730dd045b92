"""Calibration and evaluation text: bundled corpora, local files, hub datasets.

A *source* names some text. It is one of

* a bundled dataset name (``calibration/datasets.json``): ``"austen"`` (the
  default calibration text), ``"austen-eval"`` and ``"pydocs-eval"`` (held-out
  evaluation texts of two domains; never calibrate on them);
* a local file: ``.txt`` (the whole file is one document), ``.jsonl`` /
  ``.json`` / ``.parquet`` / ``.csv`` (one document per row, read from
  ``text_column`` with the ``datasets`` library);
* a local folder: every such file under it, in sorted path order;
* a Hugging Face hub dataset ``"name"`` or ``"name:config"`` (needs a hub).

Token streams join the documents with ``"\\n\\n"`` and add no special tokens.
"""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path

import torch

from quantkit.resources import calibration_dir

__all__ = [
    "BUNDLED_DIR",
    "DEFAULT_CALIBRATION",
    "DEFAULT_EVALUATION",
    "SECOND_EVALUATION",
    "bundled_datasets",
    "calibration_batch",
    "evaluation_tokens",
    "held_out_batch",
    "load_texts",
]

DEFAULT_CALIBRATION = "austen"
DEFAULT_EVALUATION = "austen-eval"
SECOND_EVALUATION = "pydocs-eval"

DOC_SEPARATOR = "\n\n"
# file suffix -> builder of datasets.load_dataset; .txt is read directly (one document per file)
_TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SUFFIXES = (".txt", *_TABLE_BUILDERS)


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
    """Bundled dataset name -> {"file", "role", "description", "source", "chars", "sha256"}."""
    return {name: dict(entry) for name, entry in _read_datasets_json().items()}


def _read_txt(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from e


def _table_texts(builder: str, files: list[Path], text_column: str, what: str) -> list[str]:
    import datasets

    # streaming: rows are read from the files as they are; no Arrow cache is written
    ds = datasets.load_dataset(
        builder, data_files=[str(f) for f in files], split="train", streaming=True
    )
    texts = []
    for i, row in enumerate(ds):
        if text_column not in row:
            raise ValueError(
                f"{what} has no column {text_column!r}; its columns are {sorted(row)} "
                f"(choose one with text_column=...)"
            )
        value = row[text_column]
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(
                f"{what}: column {text_column!r} holds {type(value).__name__}, not text (row {i})"
            )
        texts.append(value)
    return texts


def _local_texts(path: Path, text_column: str) -> list[str]:
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

    texts: list[str] = []
    for f in files:  # one file at a time keeps folder order = sorted path order
        suffix = f.suffix.lower()
        if suffix == ".txt":
            texts.append(_read_txt(f))
        else:
            texts.extend(_table_texts(_TABLE_BUILDERS[suffix], [f], text_column, str(f)))
    return texts


def _hub_texts(source: str, split: str, text_column: str) -> list[str]:
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
    if text_column not in ds.column_names:
        raise ValueError(
            f"hub dataset {source!r} (split {split!r}) has no column {text_column!r}; "
            f"its columns are {ds.column_names} (choose one with text_column=...)"
        )
    return [t for t in ds[text_column] if t]


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or Path(source).suffix.lower() in _SUFFIXES
    )


def load_texts(source: str, split: str = "train", text_column: str = "text") -> list[str]:
    """The documents of ``source`` (see the module docstring), in order.

    ``split`` applies to hub datasets only; local table files are read whole.
    Raises FileNotFoundError for a missing path and ValueError for an unknown
    name, an unreadable file or a missing ``text_column`` (listing the columns).
    """
    bundled = bundled_datasets()
    if source in bundled:
        return [_read_txt(BUNDLED_DIR / bundled[source]["file"])]

    path = Path(source).expanduser()
    if path.exists():
        texts = _local_texts(path, text_column)
        if not any(texts):
            raise ValueError(f"{source!r} holds no text")
        return texts

    names = ", ".join(bundled)
    if _looks_like_path(source):
        raise FileNotFoundError(f"no such file or folder: {source!r} (bundled datasets: {names})")
    close = difflib.get_close_matches(source, list(bundled), n=1, cutoff=0.8)
    if close and "/" not in source:  # a typo of a bundled name: do not wait on the hub
        raise ValueError(
            f"unknown dataset {source!r}; did you mean {close[0]!r}? (bundled datasets: {names})"
        )
    return _hub_texts(source, split, text_column)


_STREAMS: dict[tuple[int, str], tuple[object, torch.Tensor]] = {}  # (id(tokenizer), source) -> (tokenizer, ids)


def _token_stream(tokenizer, source: str) -> torch.Tensor:
    """[T] int64: the documents of ``source`` joined by DOC_SEPARATOR, tokenized once.

    The last few streams are kept (a corpus of several MB takes seconds to
    tokenize); the entry holds the tokenizer itself, so an id is never reused.
    """
    key = (id(tokenizer), source)
    hit = _STREAMS.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    text = DOC_SEPARATOR.join(load_texts(source))
    # verbose=False: a stream longer than model_max_length is intended here
    ids = tokenizer(
        text, add_special_tokens=False, return_attention_mask=False, verbose=False
    )["input_ids"]
    stream = torch.tensor(ids, dtype=torch.long)
    if len(_STREAMS) >= 4:
        _STREAMS.pop(next(iter(_STREAMS)))
    _STREAMS[key] = (tokenizer, stream)
    return stream


def evaluation_tokens(tokenizer, source: str) -> torch.Tensor:
    """[T] int64: the whole token stream of ``source``, no special tokens added."""
    return _token_stream(tokenizer, source).clone()  # the cached stream stays untouched


def _calibration_starts(T: int, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, T - seqlen, (num_samples,), generator=gen)  # [N]


def _check_window_args(num_samples, seqlen) -> None:
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not isinstance(seqlen, int) or seqlen <= 0:
        raise ValueError(f"seqlen must be a positive integer, got {seqlen!r}")


def _stream_for_windows(tokenizer, source: str, seqlen: int) -> torch.Tensor:
    ids = _token_stream(tokenizer, source)  # [T]
    if ids.numel() < seqlen + 1:
        raise ValueError(
            f"{source!r} has {ids.numel()} tokens; a window of seqlen={seqlen} needs at least {seqlen + 1}"
        )
    return ids


def calibration_batch(
    tokenizer, source: str, num_samples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """[num_samples, seqlen] int64: windows of the token stream at seeded random offsets.

    Offsets are drawn uniformly (with replacement) from [0, T - seqlen - 1], so
    each window is followed by at least one more token of the stream; the
    same (source, tokenizer, num_samples, seqlen, seed) always gives the same batch.
    """
    _check_window_args(num_samples, seqlen)
    ids = _stream_for_windows(tokenizer, source, seqlen)
    starts = _calibration_starts(ids.numel(), num_samples, seqlen, seed)
    return ids[starts[:, None] + torch.arange(seqlen)[None, :]]  # [N, seqlen]


def held_out_batch(
    tokenizer, source: str, windows: int, seqlen: int, seed: int = 0, calibration: tuple[int, int] | None = None
) -> tuple[torch.Tensor, bool]:
    """([windows, seqlen] int64, disjoint): windows of ``source`` for checking the
    quantized model on text it was not fitted to.

    calibration (num_samples, calib_seqlen): the calibration batch drawn from the
    same source with the same seed; the windows then overlap neither it nor each
    other, drawn at seeded random offsets of its token stream. Where the text is
    too short for that they are drawn like calibration windows and `disjoint` is
    False (said in the report). calibration None (nothing is calibrated, e.g.
    round-to-nearest): any window is held back, so only a few pieces of the text
    around seeded random offsets are tokenized, not the whole stream.
    """
    _check_window_args(windows, seqlen)
    if calibration is None:
        return _windows_from_pieces(tokenizer, source, windows, seqlen, seed), True
    ids = _stream_for_windows(tokenizer, source, seqlen)
    T = ids.numel()
    num_samples, calib_seqlen = calibration
    taken = torch.zeros(T + seqlen, dtype=torch.bool)  # positions some window already covers
    if T > calib_seqlen:
        for s in _calibration_starts(T, num_samples, calib_seqlen, seed).tolist():
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
