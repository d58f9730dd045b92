"""Calibration mixes and chat-formatted conversations (quantkit.calibration)."""

from __future__ import annotations

import json

import pytest
import torch

from quantkit import calibration as cal
from quantkit.parsing import RecipeError
from quantkit.recipe import CalibrationConfig, Recipe

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE (no hub) that knows the template's markers as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = (cal.BUNDLED_DIR / cal.bundled_datasets()["austen-eval"]["file"]).read_text("utf-8")[:50_000]
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=specials)


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    import copy

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = TEMPLATE
    return chat


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Two short plain texts and a file of conversations."""
    folder = tmp_path_factory.mktemp("mix")
    book = (cal.BUNDLED_DIR / cal.bundled_datasets()["austen"]["file"]).read_text("utf-8")
    (folder / "a.txt").write_text(book[:20_000], "utf-8")
    (folder / "b.txt").write_text(book[-20_000:], "utf-8")
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: who called on Mrs. Bennet?"},
                          {"role": "assistant", "content": f"Answer {i}: " + book[i * 300 : i * 300 + 250]}]}
            for i in range(60)]
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return folder


# ------------------------------------------------------------------ parsing


def test_bundled_mix_has_four_calibration_parts_in_equal_shares():
    parts = cal.parse_mix(cal.DEFAULT_CALIBRATION)
    index = cal.bundled_datasets()
    assert len(parts) >= 4 and sum(p.share for p in parts) == pytest.approx(1.0)
    assert len({p.share for p in parts}) == 1  # equal shares, by design
    for p in parts:
        assert index[p.source]["role"] == "calibration" and "file" in index[p.source]
    assert "austen" in [p.source for p in parts]
    # the evaluation texts are never calibration parts
    assert not {p.source for p in parts} & set(cal.EVALUATION_TEXTS)


def test_spec_weights_are_normalized_and_default_to_one():
    parts = cal.parse_mix("austen@3, gitdocs")
    assert [(p.source, p.share) for p in parts] == [("austen", 0.75), ("gitdocs", 0.25)]
    assert cal.parse_mix("austen") == [cal.Part("austen", 1.0)]


@pytest.mark.parametrize("spec, message", [
    ("austen@0,gitdocs@1", r"weight of 'austen' must be a positive number, got '0'"),
    ("austen@-1,gitdocs", r"weight of 'austen' must be a positive number"),
    ("austen@nan,gitdocs", r"weight of 'austen' must be a positive number"),
    ("austen@lots,gitdocs", r"weight of 'austen' is 'lots', not a number"),
    ("austen,,gitdocs", r"an item names no source"),
    ("@2", r"an item names no source"),
    ("austen@1,austen@2", r"names 'austen' twice"),
    ("mix@1,austen@1", r"'mix' is itself a mix; list its parts instead \(austen@0.25"),
    ("", r"must name a corpus, a path, a dataset or a mix"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        cal.parse_mix(spec)


def test_an_existing_path_with_a_comma_is_one_source(tmp_path):
    odd = tmp_path / "notes,v2@final.txt"
    odd.write_text("text " * 100, "utf-8")
    assert cal.parse_mix(str(odd)) == [cal.Part(str(odd), 1.0)]


@pytest.mark.parametrize("total, shares, want", [
    (128, [0.25] * 4, [32] * 4),
    (10, [1 / 3] * 3, [4, 3, 3]),  # ties go to the earlier part
    (5, [0.7, 0.2, 0.1], [4, 1, 0]),
    (1, [0.5, 0.5], [1, 0]),
])
def test_split_counts(total, shares, want):
    assert cal.split_counts(total, shares) == want


def test_recipe_refuses_a_bad_mix_and_a_bad_chat_template_at_load():
    with pytest.raises(RecipeError, match=r"calibration: calibration mix 'austen@0,gitdocs'"):
        Recipe.from_dict({"name": "x", "calibration": {"data": "austen@0,gitdocs"}})
    with pytest.raises(RecipeError, match=r"calibration.chat_template: invalid value 'yes'; valid values: 'auto', True, False"):
        Recipe.from_dict({"name": "x", "calibration": {"chat_template": "yes"}})
    with pytest.raises(ValueError, match="chat_template must be auto, true or false"):
        CalibrationConfig(chat_template="on")
    assert CalibrationConfig().data == cal.DEFAULT_CALIBRATION == "mix"


# ------------------------------------------------------------------ batches


def test_mix_batch_is_each_parts_share_drawn_with_its_own_seed(tokenizer, texts):
    a, b = str(texts / "a.txt"), str(texts / "b.txt")
    batch = cal.calibration_batch(tokenizer, f"{a}@3,{b}@1", 8, 32, seed=5)
    assert batch.shape == (8, 32) and batch.dtype == torch.long
    assert torch.equal(batch[:6], cal.calibration_batch(tokenizer, a, 6, 32, seed=5))
    assert torch.equal(batch[6:], cal.calibration_batch(tokenizer, b, 2, 32, seed=6))
    # a one-part mix is its source
    assert torch.equal(cal.calibration_batch(tokenizer, f"{a}@1", 8, 32, seed=5),
                       cal.calibration_batch(tokenizer, a, 8, 32, seed=5))
    assert torch.equal(batch, cal.calibration_batch(tokenizer, f"{a}@3,{b}@1", 8, 32, seed=5))  # repeatable


def test_plain_text_windows_are_unchanged_by_the_mix_code(tokenizer, texts):
    """A single text draws exactly what it drew before mixes existed: uniform offsets of the whole stream."""
    path = texts / "a.txt"
    ids = tokenizer(path.read_text("utf-8"), add_special_tokens=False)["input_ids"]
    gen = torch.Generator().manual_seed(3)
    starts = torch.randint(0, len(ids) - 16, (5,), generator=gen)
    want = torch.tensor(ids)[starts[:, None] + torch.arange(16)[None, :]]
    assert torch.equal(cal.calibration_batch(tokenizer, str(path), 5, 16, seed=3), want)


def test_mix_held_out_windows_avoid_each_parts_calibration_windows(tokenizer, texts):
    a, b = str(texts / "a.txt"), str(texts / "b.txt")
    spec = f"{a}@1,{b}@1"
    calib = cal.calibration_batch(tokenizer, spec, 8, 32, seed=0)
    held, disjoint = cal.held_out_batch(tokenizer, spec, 4, 32, seed=0, calibration=(8, 32))
    assert held.shape == (4, 32) and disjoint
    rows = {tuple(r) for r in calib.tolist()}
    assert not any(tuple(r) in rows for r in held.tolist())
    assert torch.equal(held[:2], cal.held_out_batch(tokenizer, a, 2, 32, seed=0, calibration=(4, 32))[0])


def test_evaluating_on_a_mix_is_refused(tokenizer, texts):
    with pytest.raises(ValueError, match="is a calibration mix; evaluate on one text at a time"):
        cal.evaluation_tokens(tokenizer, f"{texts / 'a.txt'}@1,{texts / 'b.txt'}@1")


# ------------------------------------------------------------ conversations


def test_conversations_are_written_with_the_chat_template(chat_tokenizer, texts):
    source = str(texts / "chat.jsonl")
    docs = cal.load_documents(source)
    assert len(docs) == 60 and docs[0][0] == {"role": "user", "content": "Question 0: who called on Mrs. Bennet?"}
    batch = cal.calibration_batch(chat_tokenizer, source, 6, 64, seed=1)
    user = chat_tokenizer.convert_tokens_to_ids("<|user|>")
    assert (batch[:, 0] == user).all()  # every window starts where a conversation starts
    assert (batch == chat_tokenizer.convert_tokens_to_ids("<|assistant|>")).any()
    parts = cal.calibration_parts(chat_tokenizer, source, 6)
    assert parts == [{"source": source, "share": 1.0, "samples": 6, "chat_template": True}]


def test_conversations_as_plain_lines_without_a_template(tokenizer, chat_tokenizer, texts):
    source = str(texts / "chat.jsonl")
    specials = set(tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|end|>"]))
    for tok, mode in ((tokenizer, "auto"), (chat_tokenizer, False)):
        ids = cal.evaluation_tokens(tok, source, chat_template=mode)
        assert not specials & set(ids.tolist())
        assert tok.decode(ids[:40]).startswith("Question 0: who called on Mrs. Bennet?\nAnswer 0:")
    assert cal.calibration_parts(tokenizer, source, 4)[0]["chat_template"] is False
    with pytest.raises(ValueError, match="holds conversations and chat_template is true, but the tokenizer has no chat template"):
        cal.calibration_batch(tokenizer, source, 4, 16, chat_template=True)


def test_plain_text_is_never_wrapped_in_the_template(tokenizer, chat_tokenizer, texts):
    source = str(texts / "a.txt")
    assert torch.equal(cal.calibration_batch(chat_tokenizer, source, 4, 16, chat_template=True),
                       cal.calibration_batch(tokenizer, source, 4, 16))


def test_malformed_conversations_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n", "utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl \(row 0\): column 'messages' must hold a list of"):
        cal.load_documents(str(bad))
    neither = tmp_path / "neither.jsonl"
    neither.write_text(json.dumps({"body": "x"}) + "\n", "utf-8")
    with pytest.raises(ValueError, match=r"has no column 'text'; its columns are \['body'\].*'messages' column"):
        cal.load_documents(str(neither))


def test_bundled_dialogue_is_conversations():
    index = cal.bundled_datasets()
    dialogue = [n for n, e in index.items() if e.get("format") == "conversations"]
    assert dialogue and all(index[n]["role"] == "calibration" for n in dialogue)
    for name in dialogue:
        docs = cal.load_documents(name)
        assert len(docs) > 100
        for conv in docs:
            assert len(conv) >= 2 and conv[0]["role"] == "user"
            assert all(m["role"] == ("user", "assistant")[i % 2] and m["content"] for i, m in enumerate(conv))


# ---------------------------------------------------------------------- CLI


@pytest.mark.parametrize("args, fragments", [
    (["--calib-data", "austen@0,pycode"], ["calibration mix 'austen@0,pycode'", "must be a positive number"]),
    (["--calib-data", "austen@1,austen@2"], ["names 'austen' twice"]),
    (["--calib-data", "./no-such-notes.txt@1,austen@1"], ["no such file or folder", "no-such-notes.txt"]),
    (["--chat-template", "maybe"], ["--chat-template must be auto, on or off", "'maybe'"]),
])
def test_cli_refuses_a_bad_mix_and_writes_nothing(tiny_model_dir, tmp_path, args, fragments):
    from test_bad_inputs import assert_clean_error, cli

    out = tmp_path / "out"
    assert_clean_error(*cli("quantize", tiny_model_dir, "--recipe", "w4a16-gptq", "--out", out, "--num-samples", 4,
                            "--seqlen", 32, *args), *fragments)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_reports_the_parts_of_a_mix(tiny_model_dir, tmp_path, texts):
    from test_bad_inputs import cli

    out = tmp_path / "out"
    spec = f"{texts / 'a.txt'}@3,{texts / 'chat.jsonl'}@1"
    result, text = cli("quantize", tiny_model_dir, "--recipe", "w4a16-gptq", "--out", out, "--num-samples", 8,
                       "--seqlen", 32, "--calib-data", spec, "--json")
    assert result.exit_code == 0, text
    report = json.loads((out / "quantization_report.json").read_text())
    parts = report["calibration"]["parts"]
    assert [(p["source"], p["samples"], p["chat_template"]) for p in parts] == [
        (str(texts / "a.txt"), 6, False), (str(texts / "chat.jsonl"), 2, False)]  # the tiny tokenizer has no template
    assert report["calibration"]["data"] == spec


# ------------------------------------------------------------------ scripts/calibration_transfer.py

def test_calibration_transfer_scores_each_calibration_against_the_targets_own(tiny_model_dir, texts, tmp_path,
                                                                              monkeypatch):
    """The layer-level proxy: a text calibrated on itself scores exactly 1 (its own rounding is the
    oracle); every other score is finite and positive; the model's own text is a source."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "calibration_transfer.py"
    out = tmp_path / "t.json"
    a, b = str(texts / "a.txt"), str(texts / "b.txt")
    monkeypatch.setattr(sys, "argv", [str(script), "--model", str(tiny_model_dir), "--sources", a, "generated",
                                      "--targets", a, b, "--windows", "2", "--seqlen", "32", "--blocks", "2",
                                      "--group-size", "32", "--json-out", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    result = json.loads(out.read_text())
    score = result["score"]
    assert set(score) == {a, "generated", "rtn"} and len(result["linears"]) == 14  # 2 blocks x 7 linears
    assert score[a][a] == pytest.approx(1.0, rel=1e-9)
    assert all(0 < score[r][t] < float("inf") for r in score for t in (a, b))


def test_calibration_transfer_leaves_each_domain_out_of_a_mix(tiny_model_dir, texts, tmp_path, monkeypatch):
    """A mix is its parts' Hessians weighted; leaving a domain out of a two-part mix leaves the other
    part alone, so that column equals the other part's own score there; a grid row with the same
    shares as a named mix scores as it does; a domain alone has nothing left when it is left out."""
    import math
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "calibration_transfer.py"
    out = tmp_path / "t.json"
    a, b = str(texts / "a.txt"), str(texts / "b.txt")
    mix = f"{a}@1,{b}@1"
    monkeypatch.setattr(sys, "argv", [str(script), "--model", str(tiny_model_dir), "--sources", b, mix,
                                      "--targets", a, "--leave-out", a, b, "--grid", "2", "--windows", "2",
                                      "--seqlen", "32", "--blocks", "2", "--group-size", "32", "--json-out", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    score = json.loads(out.read_text())["score"]
    assert score[mix][f"without {a}, on {a}"] == score[b][a]
    assert math.isnan(score[b][f"without {b}, on {b}"]) and math.isnan(score[b]["worst left out"])
    assert score[f"{a}@0.5,{b}@0.5"] == pytest.approx(score[mix], rel=1e-12)
    assert score[mix]["worst left out"] == max(score[mix][f"without {d}, on {d}"] for d in (a, b)) > 1.0
