#!/usr/bin/env python3
"""Rebuild the bundled text corpora in calibration/ from Debian packages.

    python scripts/build_corpus.py            # write calibration/*.txt + datasets.json
    python scripts/build_corpus.py --check    # rebuild in memory, compare with the shipped files

Needs (installs nothing itself):
  * Debian package ``r-cran-janeaustenr`` (the six novels as an R lazy-load
    database) and the PyPI package ``rdata`` to read it;
  * Debian package ``python3.11-doc`` (the Python 3.11 documentation as HTML).

The output is a pure function of those two packages, so every run on the same
package versions writes byte-identical files.

Outputs (UTF-8, paragraphs separated by one blank line, trailing newline):
  austen-calib.txt   Pride and Prejudice, Sense and Sensibility, Mansfield Park, Emma
  austen-eval.txt    Persuasion, then Northanger Abbey (held out)
  pydocs-eval.txt    prose of the Python 3.11 Tutorial, FAQ and HOWTOs, code stripped
                     (held out: a second domain, never used for calibration)
  LICENSES.txt       the notices that travel with the texts
  datasets.json      bundled dataset name -> file, role, source, size, sha256
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import re
import subprocess
import sys
import warnings
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


def psf_license() -> str:
    page = (PYDOCS_HTML / "license.html").read_text("utf-8")
    m = re.search(r'id="psf-license".*?<h3>(.*?)<a.*?<pre[^>]*>(.*?)</pre>', page, re.DOTALL)
    if not m:
        die(f"PSF license text not found in {PYDOCS_HTML / 'license.html'}")
    title, body = (html.unescape(re.sub(r"<[^>]+>", "", g)).strip() for g in m.groups())
    return f"{title}\n\n{body}\n"


def licenses_text() -> str:
    mit = AUSTEN_COPYRIGHT.read_text("utf-8") if AUSTEN_COPYRIGHT.exists() else ""
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
    )


# ---------------------------------------------------------------------- main


def build() -> dict[str, str]:
    """Every shipped file name -> its exact content."""
    calib, austen_eval = build_austen()
    pydocs = build_pydocs()
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
    files = {"austen-calib.txt": calib, "austen-eval.txt": austen_eval, "pydocs-eval.txt": pydocs}

    def entry(file: str, role: str, description: str, source: dict) -> dict:
        text = files[file]
        return {
            "file": file,
            "role": role,
            "description": description,
            "source": source,
            "chars": len(text),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        }

    datasets = {
        "austen": entry(
            "austen-calib.txt", "calibration",
            "Jane Austen: " + ", ".join(CALIB_NOVELS.values()), austen_src,
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
    }  # fmt: skip
    files["datasets.json"] = json.dumps(datasets, indent=2) + "\n"
    files["LICENSES.txt"] = licenses_text()
    return files


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
    args = ap.parse_args(argv)

    files = build()
    if args.check:
        stale = [n for n, text in files.items() if not (args.out / n).exists()
                 or (args.out / n).read_text("utf-8") != text]  # fmt: skip
        for name in stale:
            print(f"differs: {args.out / name}", file=sys.stderr)
        print("up to date" if not stale else f"{len(stale)} file(s) differ", file=sys.stderr)
        return 1 if stale else 0

    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"{args.out / name}: {len(text):,} chars", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
