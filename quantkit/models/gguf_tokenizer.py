"""The tokenizer transformers builds from a .gguf file, checked against the file's own vocabulary.

transformers rebuilds a GGUF file's tokenizer with a converter of its own per architecture
(integrations/ggml.py), and some versions build a wrong one without a word: transformers 5.17 turns
Gemma 3's SentencePiece vocabulary into a tokenizer that adds no <bos> and splits "truth" into
"▁t", "ru", "th" (the model then reads garbage: perplexity 109 -> 576 on our bundled text), and
fails outright on a Gemma file whose vocabulary is byte-level BPE. `load_gguf_tokenizer` builds the
tokenizer and `check_gguf_tokenizer` asks it three cheap questions the file answers:

- BOS and EOS: the file's tokenizer.ggml.bos_token_id / eos_token_id become the tokenizer's BOS / EOS
  where they differ, with a note (5.17 gives a Qwen file's tokenizer an EOS "<|endoftext|>" of its own,
  and SmolLM2's "<|im_start|>" for its "<|im_end|>": the text's tokens are the same, only the stop
  token would be wrong), and the tokenizer must prepend BOS exactly when tokenizer.ggml.add_bos_token
  (where the file has that key) says so;
- whole words: the first WORD_PIECES pieces of the file's vocabulary that are a word-start marker
  ("▁" for SentencePiece, "Ġ" for byte-level BPE) and 3 or more lowercase ASCII letters ("▁the",
  "▁and", "▁that", ...) are whole words the vocabulary holds as one piece; at least MIN_WHOLE of them
  must encode (after a first word, "a the") to that one piece;
- a round trip: a short sentence decodes back to itself.

Any failure is one ModelLoadError naming the file, what the file says, what the tokenizer produced,
the installed transformers version and the way out. The check reads the file's scalar metadata and
the first few hundred to thousand token strings (quantkit.models.gguf_meta), and encodes some
thirty short strings: tens of milliseconds, where building the tokenizer alone takes seconds.
"""

from __future__ import annotations

import math
import os
import re
from itertools import islice
from pathlib import Path

from quantkit.errors import ModelLoadError
from quantkit.models.gguf_meta import GGUFArray, GGUFMeta, iter_gguf_strings, log, read_gguf_meta

WORD_PIECES = 32  # how many whole-word pieces of the vocabulary are encoded
MIN_WHOLE = 0.9  # the share of them that must come back as their one piece
SCAN_LIMIT = 30_000  # token strings read at most while looking for them (real vocabularies: < 1000)
ROUND_TRIP = "It is a truth universally acknowledged, that a single man must be in want of a wife."
_LEAD = "a"  # the word before each whole word: its leading space is then a plain space in every scheme
_MARKERS = {"llama": ("▁",), "gpt2": ("Ġ",)}  # tokenizer.ggml.model -> how a piece marks a word's start
_TOKENS = "tokenizer.ggml.tokens"
# vocabularies whose add_bos_token is not the model's: llama.cpp forces it on for Gemma 4, whose own
# tokenizer adds no BOS (its chat template writes <bos>; ggml-org/llama.cpp#21500, transformers follows)
_BOS_FLAG_NOT_THE_MODELS = {"gemma4"}


def _advice() -> str:
    import transformers

    return (f"(transformers {transformers.__version__} is installed). Upgrade transformers (pip install -U "
            f"transformers), or load the original safetensors folder (the Hugging Face folder this GGUF was "
            f"converted from, which carries tokenizer.json) instead of the .gguf")


def whole_word_pieces(path: str | os.PathLike, meta: GGUFMeta, n: int = WORD_PIECES) -> list[tuple[int, str, str]]:
    """(id, piece, word) for the first `n` pieces of the file's vocabulary that are a word-start marker
    and 3+ lowercase ASCII letters, in vocabulary order (SentencePiece and BPE vocabularies both
    put frequent pieces first); [] where the file has no token list or no such pieces."""
    if not isinstance(meta.metadata.get(_TOKENS), GGUFArray):
        return []
    markers = _MARKERS.get(meta.metadata.get("tokenizer.ggml.model"), ("▁", "Ġ"))
    rule = re.compile(f"[{''.join(markers)}]([a-z]{{3,}})")
    found = []
    for i, token in enumerate(islice(iter_gguf_strings(path, _TOKENS, meta), SCAN_LIMIT)):
        word = rule.fullmatch(token)
        if word:
            found.append((i, token, word.group(1)))
            if len(found) == n:
                break
    return found


def _shown(tokenizer, ids: list[int]) -> str:
    return "[" + ", ".join(repr(t) for t in tokenizer.convert_ids_to_tokens(ids)) + "]"


def check_gguf_tokenizer(source: str | os.PathLike, tokenizer, meta: GGUFMeta | None = None) -> list[str]:
    """Raise ModelLoadError when `tokenizer` (what transformers built from the GGUF file `source`)
    does not encode as the file's vocabulary does: BOS, whole words, a round trip (module docstring).
    A BOS or EOS id other than the file's is set to the file's in place; the notes saying so are
    returned (and logged on the "quantkit" logger, which the CLI prints as `note:` lines)."""
    meta = meta if meta is not None else read_gguf_meta(source)
    md = meta.metadata
    problems: list[str] = []
    notes: list[str] = []

    # BOS and EOS: which ids (another id than the file's is repaired: the text's tokens do not
    # change, only which token the tokenizer calls BOS / EOS), and whether BOS is prepended
    file_ids = {}
    for name in ("bos", "eos"):
        said = md.get(f"tokenizer.ggml.{name}_token_id")
        file_ids[name] = said if isinstance(said, int) and not isinstance(said, bool) else None
        built = getattr(tokenizer, f"{name}_token_id")
        if file_ids[name] is None or built == file_ids[name]:
            continue
        if not 0 <= file_ids[name] < len(tokenizer):
            problems.append(f"tokenizer.ggml.{name}_token_id is {file_ids[name]}, outside the tokenizer's "
                            f"{len(tokenizer)} tokens")
            continue
        token = tokenizer.convert_ids_to_tokens(file_ids[name])
        notes.append(f"{Path(source).name}: tokenizer.ggml.{name}_token_id is {file_ids[name]} ({token!r}); "
                     f"transformers' tokenizer had {built} ({getattr(tokenizer, f'{name}_token')!r}): set to the "
                     f"file's")
        setattr(tokenizer, f"{name}_token", token)
    file_bos = file_ids["bos"]
    add_bos = md.get("tokenizer.ggml.add_bos_token")
    if isinstance(add_bos, bool) and md.get("tokenizer.ggml.model") not in _BOS_FLAG_NOT_THE_MODELS:
        bos = file_bos if file_bos is not None else tokenizer.bos_token_id
        probe = tokenizer(_LEAD).input_ids
        plain = tokenizer(_LEAD, add_special_tokens=False).input_ids
        prepends = bos is not None and probe[:1] == [bos] and plain[:1] != [bos]
        if add_bos != prepends:
            want = ("adds no BOS" if not add_bos else f"starts every text with BOS id {bos}" if bos is not None
                    else "starts every text with a BOS, which neither the file nor the tokenizer names")
            problems.append(f"tokenizer.ggml.add_bos_token is {str(add_bos).lower()} (the model {want}), the "
                            f"tokenizer encodes {_LEAD!r} as {_shown(tokenizer, probe)} "
                            f"({'with' if prepends else 'no'} BOS)")

    # whole words the vocabulary holds as one piece
    pieces = whole_word_pieces(source, meta)
    if pieces:
        lead = tokenizer(_LEAD, add_special_tokens=False).input_ids
        got = tokenizer([f"{_LEAD} {word}" for _, _, word in pieces], add_special_tokens=False).input_ids
        split = [(piece, i, ids[len(lead):]) for (i, piece, _), ids in zip(pieces, got) if ids != lead + [i]]
        if len(pieces) - len(split) < math.ceil(MIN_WHOLE * len(pieces)):
            shown = "; ".join(f"{piece!r} (id {i}) -> {_shown(tokenizer, ids)}" for piece, i, ids in split[:4])
            problems.append(f"of {len(pieces)} whole words the file's vocabulary holds as one piece "
                            f"({', '.join(repr(p) for _, p, _ in pieces[:6])}, ...), {len(split)} do not encode "
                            f"to that piece (after {_LEAD!r}): {shown}")

    # a round trip
    ids = tokenizer(ROUND_TRIP, add_special_tokens=False).input_ids
    back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if back != ROUND_TRIP:
        problems.append(f"{ROUND_TRIP!r} encodes to {len(ids)} tokens that decode back as {back!r}")

    if not problems:
        for note in notes:
            log.warning(note)
        return notes
    if problems:
        raise ModelLoadError(
            f"{source}: the tokenizer transformers built from this GGUF file does not encode text as the file's "
            f"vocabulary does (the model would be given other tokens than the file's): {'; '.join(problems)} "
            f"{_advice()}")


def load_gguf_tokenizer(source: str | os.PathLike, meta: GGUFMeta | None = None):
    """transformers' tokenizer for the GGUF file `source`, checked (check_gguf_tokenizer). A converter
    that fails (5.17 on a Gemma file with a byte-level BPE vocabulary: TypeError) is a ModelLoadError."""
    from transformers import AutoTokenizer

    path = Path(source)
    meta = meta if meta is not None else read_gguf_meta(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers' converters: whatever they raise, there is no tokenizer
        kind = f"a {meta.metadata.get('tokenizer.ggml.model')!r} vocabulary, architecture {meta.architecture!r}"
        raise ModelLoadError(f"{source}: transformers cannot build the tokenizer of this GGUF file ({kind}: "
                             f"{type(e).__name__}: {str(e)[:300]}) {_advice()}") from e
    check_gguf_tokenizer(source, tokenizer, meta)
    return tokenizer
