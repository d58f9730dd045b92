"""Where quantkit writes, and what it may replace there.

Every folder quantkit writes (a checkpoint, an export) is built in a hidden
temporary folder beside the output, `.<name>.tmp-<host>-<pid>`, and renamed
into place at the end, so a failed run leaves no half-written output. Its
last file is `quantkit_manifest.json`, the list of every file it holds.

`force` replaces an existing output only when nothing in it can be lost:
    - an empty folder, or
    - a folder quantkit wrote: its manifest lists every file in it (a user's
      file added since is not replaced), or, for checkpoints from before the
      manifest, a quantization report and only the files a checkpoint holds.
Whatever `force` says, an output is refused when it is, contains or lies
inside one of the run's inputs (the model, the checkpoint being exported, the
recipe file, the calibration data), or is a filesystem root, the home folder,
the current directory or a folder above either.

A run killed outright (SIGKILL, a power cut) leaves its temporary folder; the
next run on the same output removes it once the process that made it is gone,
and says so (logger "quantkit"). A kill in the middle of the final swap leaves
the previous output as `.<name>.old-<host>-<pid>`: it is put back.

A quantization streams each finished block into its temporary folder with a
journal (quantkit.checkpoint.stream): such a folder, left by a run that died
or was interrupted, is kept for `quantkit quantize` to resume from
(`keep_resumable`); any other command on that output removes it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from quantkit import __version__
from quantkit.errors import OutputError, OutputExistsError

MANIFEST_FILE = "quantkit_manifest.json"
JOURNAL_DIR = "quantkit_journal"  # inside a temporary folder: a run that can be resumed
LEGACY_REPORT_FILE = "quantization_report.json"
# what a checkpoint written before the manifest existed may hold (all at the top level)
_LEGACY_FILES = re.compile(
    r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json|vocab\.json"
    r"|merges\.txt|chat_template\.(jinja|json)|quantkit_recipe\.yaml|quantization_report\.json"
    r"|quantization_error\.png"
)

log = logging.getLogger("quantkit")


# --------------------------------------------------------------------------- what may be replaced

def _files_under(folder: Path) -> list[str]:
    """Every entry under `folder` as a relative POSIX path; folders end in "/"."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [(rel / d).as_posix() + "/" for d in dirs] + [(rel / f).as_posix() for f in files]
    return sorted(out)


def _read_json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def why_not_replaceable(folder: Path) -> str | None:
    """None when `force` may replace `folder` (empty, or written by quantkit and
    untouched since); otherwise why not, in a few words."""
    entries = _files_under(folder)
    if not entries:
        return None
    manifest = _read_json_object(folder / MANIFEST_FILE)
    if manifest is not None and isinstance(manifest.get("files"), list):
        ours = {f for f in manifest["files"] if isinstance(f, str)} | {MANIFEST_FILE}
        extra = [e for e in entries if e not in ours and not (e.endswith("/") and any(o.startswith(e) for o in ours))]
        if extra:
            return f"holds files quantkit did not write ({_few(extra)})"
        return None
    report = _read_json_object(folder / LEGACY_REPORT_FILE)
    if report is not None and "quantkit_version" in report:
        extra = [e for e in entries if not _LEGACY_FILES.fullmatch(e)]
        if extra:
            return f"holds files a quantkit checkpoint does not ({_few(extra)})"
        return None
    return "is not empty and was not written by quantkit"


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# --------------------------------------------------------------------------- where not to write

def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _protected_reason(out: Path) -> str | None:
    if out.parent == out:
        return "is a filesystem root"
    for label, place in (("your home folder", Path.home()), ("the current directory", Path.cwd())):
        with contextlib.suppress(OSError, RuntimeError):
            place = place.resolve()
            if out == place:
                return f"is {label}"
            if _is_within(place, out):
                return f"contains {label} ({place})"
    return None


def _overlap_reason(out: Path, source: Path) -> str | None:
    if out == source:
        return f"is the input {source}"
    if _is_within(source, out):
        return f"contains the input {source}"
    if _is_within(out, source):
        return f"lies inside the input {source}"
    return None


def _writable_ancestor(out: Path) -> Path:
    """The nearest existing folder above `out`, proven writable by making (and
    removing) a folder in it: found now, not after an hour of quantizing."""
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create output {out}: {ancestor} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=ancestor)
    except OSError as e:
        raise OutputError(f"cannot create output {out}: {ancestor} is not writable ({e.strerror or e})") from e
    os.rmdir(probe)
    return ancestor


def check_output(out_dir: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike | None] = (),
                 keep_resumable: bool = False) -> Path:
    """Refuse an output location before any work: see the module docstring.
    `inputs`: local paths the run reads (others, e.g. hub ids, are skipped).
    Removes what dead runs left beside it (but a resumable one when `keep_resumable`).
    Returns the resolved output path."""
    out = Path(out_dir).expanduser().resolve()
    reason = _protected_reason(out)
    for source in inputs:
        if reason is None and source is not None and Path(source).expanduser().exists():
            reason = _overlap_reason(out, Path(source).expanduser().resolve())
    if reason is not None:
        raise OutputError(f"refusing to write to {out}: it {reason}; choose another output folder")
    clean_stale(out, keep_resumable)
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"output {out} exists and is not a folder")
        if not force:
            raise OutputExistsError(f"output {out} already exists; pass --force (force=True) to replace it")
        why = why_not_replaceable(out)
        if why is not None:
            raise OutputExistsError(f"refusing to replace {out}: it {why}; --force replaces only an empty "
                                    f"folder or one quantkit wrote. Choose another output folder or empty it yourself")
    _writable_ancestor(out)
    return out


# --------------------------------------------------------------------------- what dead runs left

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _scratch_name(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{_HOST}-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process: alive as far as we can tell
    return True


def _dead_scratch(out: Path) -> list[tuple[Path, str, int]]:
    """(folder, "tmp" or "old", pid) of the scratch folders beside `out` that runs on this host
    left and whose process is gone."""
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(?:(.+)-)?(\d+)")
    found = []
    for path in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(path.name)
        if m is None or not path.is_dir() or path.is_symlink():
            continue
        kind, host, pid = m.group(1), m.group(2), int(m.group(3))
        if (host is None or host == _HOST) and not _alive(pid):
            found.append((path, kind, pid))
    return found


def dead_temporaries(out: Path) -> list[Path]:
    """The temporary folders of runs on `out` (this host) whose process is gone."""
    return [path for path, kind, _ in _dead_scratch(out) if kind == "tmp"]


def is_resumable(folder: Path) -> bool:
    return (folder / JOURNAL_DIR / "journal.json").is_file()


def clean_stale(out: Path, keep_resumable: bool = False) -> list[str]:
    """Remove the temporary folders of runs on `out` whose process is gone (on
    this host), putting back a previous output a killed swap left aside; a
    resumable one stays when `keep_resumable`.
    Returns what was done, one line each (also logged)."""
    done = []
    for path, kind, pid in _dead_scratch(out):
        if kind == "tmp" and keep_resumable and is_resumable(path):
            continue
        if kind == "old" and not out.exists():
            path.rename(out)
            done.append(f"put back {out}: a run (process {pid}) was killed while replacing it")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}, left by a run (process {pid}) that no longer exists")
    for line in done:
        log.warning(line)
    return done


# --------------------------------------------------------------------------- the atomic write

def write_manifest(folder: Path) -> None:
    files = [f for f in _files_under(folder) if not f.endswith("/") and f != MANIFEST_FILE]
    manifest = {"written_by": "quantkit", "quantkit_version": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


@contextlib.contextmanager
def atomic_output(out_dir: str | os.PathLike, force: bool = False,
                  inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out_dir` (checked again
    at that moment: a file added meanwhile stops the swap), on failure or
    interruption it is removed and the old output stays as it was."""
    out = check_output(out_dir, force, inputs)
    tmp = new_temporary(out)
    try:
        yield tmp
        commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def new_temporary(out: Path, adopt: Path | None = None) -> Path:
    """This run's temporary folder for `out`: empty, or `adopt` (a dead run's) renamed to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch_name(out, "tmp")
    if adopt is not None and adopt != tmp:
        shutil.rmtree(tmp, ignore_errors=True)
        adopt.rename(tmp)
    elif adopt is None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    return tmp


def commit_output(tmp: Path, out: Path) -> None:
    """Write `tmp`'s manifest and swap it into place as `out` (see atomic_output)."""
    write_manifest(tmp)
    if out.exists():
        why = why_not_replaceable(out) if out.is_dir() else "is not a folder"
        if why is not None:
            raise OutputExistsError(f"refusing to replace {out}: it {why} (changed during the run)")
        old = _scratch_name(out, "old")
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)  # a failed run loses nothing: the old output goes back
            raise
        shutil.rmtree(old)
    else:
        tmp.rename(out)
