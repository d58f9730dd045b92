"""Bundled corpora and the calibration / evaluation loaders (quantkit.calibration)."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch

from quantkit import calibration as cal

# The first sentence of each novel: which split holds which book.
OPENINGS = {
    "persuasion": "Sir Walter Elliot, of Kellynch Hall, in Somersetshire",
    "northangerabbey": "No one who had ever seen Catherine Morland in her infancy",
    "prideprejudice": "It is a truth universally acknowledged",
    "sensesensibility": "The family of Dashwood had long been settled in Sussex",
    "mansfieldpark": "About thirty years ago Miss Maria Ward, of Huntingdon",
    "emma": "Emma Woodhouse, handsome, clever, and rich",
}
EVAL_NOVELS = ("persuasion", "northangerabbey")
CALIB_NOVELS = ("prideprejudice", "sensesensibility", "mansfieldpark", "emma")


def bundled_text(name: str) -> str:
    return (cal.BUNDLED_DIR / cal.bundled_datasets()[name]["file"]).read_text("utf-8")


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE trained in memory (no hub), adding <bos> unless told not to."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([bundled_text("austen-eval")[:50_000]], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>")


# ------------------------------------------------------------ shipped files


def test_index_names_roles_and_files():
    index = cal.bundled_datasets()
    assert index[cal.DEFAULT_CALIBRATION]["role"] == "calibration"
    assert index[cal.DEFAULT_EVALUATION]["role"] == "evaluation"
    assert index[cal.SECOND_EVALUATION]["role"] == "evaluation"
    on_disk = json.loads((cal.BUNDLED_DIR / "datasets.json").read_text("utf-8"))
    assert index == on_disk
    for name, entry in index.items():
        if "mix" in entry:  # a mix names parts, not a file
            assert entry["role"] == "calibration" and set(entry["mix"]) <= set(index), name
            continue
        text = bundled_text(name)
        assert len(text) == entry["chars"], name
        assert hashlib.sha256(text.encode("utf-8")).hexdigest() == entry["sha256"], name
        assert entry["source"]["package"] and entry["source"]["license"], name


def test_shipped_total_under_8mb():
    total = sum(p.stat().st_size for p in cal.BUNDLED_DIR.iterdir() if p.is_file())
    assert total < 8_000_000


def test_paragraph_format_of_the_second_domain():
    text = bundled_text("pydocs-eval")
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert "\n\n\n" not in text and "\r" not in text
    paragraphs = text.split("\n\n")
    assert all(p and p == p.strip() and "\n" not in p for p in paragraphs[:-1])


@pytest.mark.parametrize("name", ["austen", "austen-eval"])
def test_austen_keeps_the_packages_line_layout(name):
    """Lines as printed (hard-wrapped near 70 columns, blank lines between
    paragraphs): the layout the peers' published perplexities were measured on."""
    text = bundled_text(name)
    assert text.endswith("\n") and "\r" not in text
    lines = text.split("\n")
    assert max(len(line) for line in lines) < 100
    assert sum(1 for line in lines if line == "") > len(lines) // 10


def test_eval_split_is_persuasion_then_northanger():
    text = bundled_text("austen-eval")
    assert text.startswith("Persuasion\n\n\nby\n\nJane Austen")
    assert 0 < text.index(OPENINGS["persuasion"]) < text.index(OPENINGS["northangerabbey"])
    assert len(text) > 500_000


def test_calibration_split_is_the_other_four_novels():
    text = bundled_text("austen")
    assert text.startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in text
    positions = [text.index(OPENINGS[n]) for n in CALIB_NOVELS]
    assert positions == sorted(positions)
    assert len(text) > 2_000_000


def test_splits_share_no_novel():
    calib, evals = bundled_text("austen"), bundled_text("austen-eval")
    pydocs = bundled_text("pydocs-eval")
    for novel in EVAL_NOVELS:
        assert OPENINGS[novel] not in calib and OPENINGS[novel] not in pydocs
    for novel in CALIB_NOVELS:
        assert OPENINGS[novel] not in evals and OPENINGS[novel] not in pydocs


def test_second_domain_is_technical_prose_not_austen():
    text = bundled_text("pydocs-eval")
    assert 200_000 < len(text) < 2_000_000
    assert text.startswith("Whetting Your Appetite")
    assert text.count("Python") > 1000
    for name in ("Elizabeth", "Darcy", "Elliot", "Catherine Morland"):
        assert text.count(name) < 5, name
    for markup in ("<div", "<span", 'class="', "¶", "&amp;", "&#"):
        assert markup not in text, markup
    assert text.count(">>> ") < 20  # interactive sessions were code blocks: dropped


def test_third_domain_is_in_no_calibration_text():
    """kjv-eval (scripture) is held out from every calibration text, the default mix included."""
    text = bundled_text("kjv-eval")
    assert 200_000 < len(text) < 1_000_000
    assert text.startswith("Genesis") and "In the beginning God created the heaven and the earth." in text
    calibration = [n for n, e in cal.bundled_datasets().items() if e["role"] == "calibration" and "file" in e]
    assert {"austen", "gitdocs", "pycode", "dialogue"} <= set(calibration)
    for name in calibration:
        calib = bundled_text(name)
        for phrase in ("In the beginning God created", "thus saith the LORD", "And Jesus answered"):
            assert phrase not in calib, (name, phrase)
    for name in ("gitdocs", "pycode"):  # the mix's parts hold nothing of the evaluation texts
        for probe in ("Whetting Your Appetite", OPENINGS["persuasion"], OPENINGS["northangerabbey"]):
            assert probe not in bundled_text(name), (name, probe)


# ------------------------------------------------------------------ loaders


def test_bundled_name_gives_one_document():
    assert cal.load_texts("pydocs-eval") == [bundled_text("pydocs-eval")]


def test_txt_file_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first paragraph\n\nsecond one\n", encoding="utf-8")
    assert cal.load_texts(str(path)) == ["first paragraph\n\nsecond one\n"]


def test_jsonl_and_custom_column(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "alpha", "body": "one"}, {"text": "beta", "body": "two"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert cal.load_texts(str(path)) == ["alpha", "beta"]
    assert cal.load_texts(str(path), text_column="body") == ["one", "two"]


def test_parquet_and_csv(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"content": ["x y z", "u v"], "n": [1, 2]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    for name in ("d.parquet", "d.csv"):
        assert cal.load_texts(str(tmp_path / name), text_column="content") == ["x y z", "u v"]


def test_folder_reads_every_file_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "sea"}\n', encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert cal.load_texts(str(tmp_path)) == ["ay", "bee", "sea"]


def test_missing_column_lists_the_columns(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "one", "id": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"'text'.*\['body', 'id'\]"):
        cal.load_texts(str(path))


def test_missing_file_names_it_and_the_bundled_names(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl") as err:
        cal.load_texts(missing)
    assert "austen-eval" in str(err.value)


def test_empty_folder_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no text files"):
        cal.load_texts(str(tmp_path))
    odd = tmp_path / "x.docx"
    odd.write_bytes(b"")
    with pytest.raises(ValueError, match=r"x\.docx.*\.docx"):
        cal.load_texts(str(odd))


def test_typo_of_a_bundled_name_fails_fast():
    with pytest.raises(ValueError, match=r"'austin'.*did you mean 'austen'.*pydocs-eval"):
        cal.load_texts("austin")


def test_hub_failure_names_source_and_bundled(monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(ValueError, match=r"'someorg/corpus:cfg'.*austen.*hub unreachable"):
        cal.load_texts("someorg/corpus:cfg")


# ------------------------------------------------------------------- tokens


def test_evaluation_tokens_whole_stream_no_special(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("One document.", encoding="utf-8")
    (tmp_path / "b.txt").write_text("Another one.", encoding="utf-8")
    ids = cal.evaluation_tokens(tokenizer, str(tmp_path))
    assert ids.dtype == torch.long and ids.dim() == 1
    expected = tokenizer("One document.\n\nAnother one.", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == expected
    assert tokenizer.bos_token_id not in ids.tolist()


def test_calibration_batch_shape_and_windows(tokenizer):
    stream = cal.evaluation_tokens(tokenizer, "pydocs-eval")
    batch = cal.calibration_batch(tokenizer, "pydocs-eval", num_samples=7, seqlen=33, seed=3)
    assert batch.shape == (7, 33) and batch.dtype == torch.long
    windows = stream[:-1].unfold(0, 33, 1)  # [T - 33, 33]: every window with a next token
    for row in batch:
        assert (windows == row).all(dim=1).any()


def test_calibration_batch_is_seeded(tokenizer):
    def draw(seed):
        return cal.calibration_batch(tokenizer, "pydocs-eval", num_samples=4, seqlen=64, seed=seed)

    a = draw(0)
    assert torch.equal(a, draw(0))
    assert not torch.equal(a, draw(1))


def test_calibration_batch_text_too_short(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("a few words only", encoding="utf-8")
    n = cal.evaluation_tokens(tokenizer, str(path)).numel()
    assert cal.calibration_batch(tokenizer, str(path), 2, n - 1).shape == (2, n - 1)
    with pytest.raises(ValueError, match=rf"{n} tokens.*seqlen={n}"):
        cal.calibration_batch(tokenizer, str(path), 2, n)


@pytest.mark.parametrize(
    "kwargs, bad",
    [({"num_samples": 0}, "num_samples.*0"), ({"seqlen": -5}, "seqlen.*-5")],
)
def test_calibration_batch_rejects_bad_sizes(tokenizer, kwargs, bad):
    args = {"num_samples": 2, "seqlen": 8, **kwargs}
    with pytest.raises(ValueError, match=bad):
        cal.calibration_batch(tokenizer, "pydocs-eval", **args)


@pytest.mark.slow  # ~8 s: the tokenizer is read from the real model's GGUF
def test_smollm2_tokenizer_on_second_domain():
    from transformers import AutoTokenizer

    from quantkit.models import default_model_path

    gguf = default_model_path()  # scripts/setup.sh installs it: missing is a failure, not a skip
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = cal.evaluation_tokens(tok, cal.SECOND_EVALUATION)
    assert 100_000 < ids.numel() < 300_000  # 159,811 with python3.11-doc 3.11.2
    assert tok.decode(ids[:20]).startswith("Whetting Your Appetite\n\nIf you do much work")
    batch = cal.calibration_batch(tok, cal.SECOND_EVALUATION, num_samples=2, seqlen=512)
    assert batch.shape == (2, 512)


def test_build_script_reproduces_shipped_texts():
    """Needs the Debian packages the script reads; skipped where they are absent."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("rdata")
    script = Path(__file__).resolve().parent.parent / "scripts" / "build_corpus.py"
    spec = importlib.util.spec_from_file_location("build_corpus", script)
    build_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_corpus)
    if not build_corpus.AUSTEN_DB.with_suffix(".rdx").exists():
        pytest.skip(f"Debian package {build_corpus.AUSTEN_PKG} not installed")
    if not build_corpus.PYDOCS_HTML.is_dir():
        pytest.skip(f"Debian package {build_corpus.PYDOCS_PKG} not installed")
    if not build_corpus.GITDOCS_DIR.is_dir():
        pytest.skip(f"Debian package {build_corpus.GITDOCS_PKG} not installed")
    if not Path(build_corpus.KJV_BIBLE).exists():
        pytest.skip(f"Debian package {build_corpus.KJV_PKG} not installed")
    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip(f"PyPI package {build_corpus.CHATTERBOT_DIST}=={build_corpus.CHATTERBOT_VERSION} not installed")
    built = build_corpus.build()
    # byte identity is promised for the same source package versions (datasets.json records them)
    changed = build_corpus.source_changes(built["datasets.json"], (cal.BUNDLED_DIR / "datasets.json").read_text("utf-8"))
    compared = []
    for entry in cal.bundled_datasets().values():
        if "file" in entry and entry["file"] not in changed:
            assert built[entry["file"]] == (cal.BUNDLED_DIR / entry["file"]).read_text("utf-8"), entry["file"]
            compared.append(entry["file"])
    if changed:
        warnings.warn(f"not compared, their source packages are at other versions here: {changed}")
    if not compared:
        pytest.skip(f"every source package is at another version than the shipped files': {changed}")
    if not changed:
        assert built["datasets.json"] == (cal.BUNDLED_DIR / "datasets.json").read_text("utf-8")
        assert built["LICENSES.txt"] == (cal.BUNDLED_DIR / "LICENSES.txt").read_text("utf-8")
