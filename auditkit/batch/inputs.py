"""What a batch scans: the adapters of a folder, a list file, or a CSV/Parquet manifest, as :class:`Entry` rows.

* a **folder** is searched recursively for adapter-looking files (``.safetensors``, and the pickle
  suffixes, so that a pickle becomes an error row instead of being silently left out); hidden files
  and folders and the batch's own output folder are skipped. What cannot be read safely is an error row,
  never left out and never read: a folder that cannot be listed, a link to a folder (not followed), a
  dangling link, a link that leads out of the folder, a FIFO, socket or device (:attr:`Entry.problem`);
* a **list file** holds one path per line (``#`` starts a comment);
* a **manifest** (``.csv``, ``.parquet``) has a ``path`` column and optionally ``id``, ``safety``,
  ``base`` and ``triggers`` (``;``-separated) overriding the batch's settings for that row.

Relative paths are relative to the list's or manifest's folder and must stay inside it, links followed
(``../`` or a linked folder out of it is refused: give an absolute path; ``~`` is not expanded). Everything is
read bounded (a Parquet manifest's decompressed size is checked in its metadata first), and every problem is a
one-line :class:`~auditkit.errors.BadInput` naming the file, raised before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from auditkit.analysis.triggers import check_given
from auditkit.errors import BadInput
from auditkit.fsutil import read_bounded
from auditkit.lora.io import PICKLE_SUFFIXES
from auditkit.models.base import Base, resolve_base

ADAPTER_SUFFIXES = frozenset({".safetensors", *PICKLE_SUFFIXES})
MANIFEST_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
COLUMNS = ("path", "id", "safety", "base", "triggers")
MAX_LIST_BYTES = 64 * 2**20
MAX_PARQUET_BYTES = 256 * 2**20
MAX_ENTRIES = 1_000_000
MAX_ID = 200


@dataclass(frozen=True)
class Entry:
    """One adapter of the batch. ``safety``/``base``: the row's own ("" / None = the batch's; safety "none" = no
    safety module); ``triggers``: added to the batch's trigger words; ``problem``: why the path is an error row
    that nothing reads ("" = none)."""

    id: str
    path: Path
    safety: str = ""
    base: Base | None = None  # the row's own base (None: the batch's)
    triggers: tuple[str, ...] = ()
    problem: str = ""

    @property
    def folder(self) -> str:
        """The report folder's name: the id made safe for a path, with a hash of the id (unique, never
        ``..`` or a path)."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.id).strip("._")[:80] or "adapter"
        return f"{slug}-{hashlib.sha256(self.id.encode()).hexdigest()[:8]}"


def read_entries(source: str | Path, exclude: Path | None = None) -> list[Entry]:
    """The entries of ``source`` (a folder, list file, manifest or single adapter file), in order."""
    source = Path(source)
    if source.is_dir():
        entries = _folder(source, exclude)
        what = "folder"
    elif source.is_file() or source.exists():
        suffix = source.suffix.lower()
        if suffix in MANIFEST_SUFFIXES:
            entries = _manifest(source, MANIFEST_SUFFIXES[suffix])
        elif suffix in ADAPTER_SUFFIXES:
            entries = [Entry(source.name, source, problem=problem_of(source))]
        else:
            entries = _list_file(source)
        what = "input"
    else:
        raise BadInput(source, "no such file or folder")
    if not entries:
        raise BadInput(source, f"the {what} names no adapter files ({', '.join(sorted(ADAPTER_SUFFIXES))})")
    return entries


def _folder(folder: Path, exclude: Path | None) -> list[Entry]:
    skip = exclude.resolve() if exclude is not None else None
    inside = folder.resolve()
    entries: list[Entry] = []

    def add(path: Path, problem: str) -> None:
        entries.append(Entry(path.relative_to(folder).as_posix(), path, problem=problem))
        if len(entries) > MAX_ENTRIES:
            raise BadInput(folder, f"more than {MAX_ENTRIES} adapter files; split the batch")

    def unreadable(exc: OSError) -> None:
        if Path(exc.filename) == folder:
            raise BadInput(folder, f"cannot read the folder ({exc.strerror or exc})")
        add(Path(exc.filename), f"cannot read the folder ({exc.strerror or exc}): its files are not scanned")

    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=False):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (skip is None or (here / d).resolve() != skip))
        for d in [d for d in dirs if (here / d).is_symlink()]:
            dirs.remove(d)
            add(here / d, "a link to a folder, not followed: give that folder itself, or list its files")
        for name in sorted(files):
            path = here / name
            if not name.startswith(".") and path.suffix.lower() in ADAPTER_SUFFIXES:
                add(path, _escapes(path, inside) or problem_of(path))
    return entries


DANGLING = "a dangling link (its target is missing: an unfetched git-annex or Git LFS file?)"


def problem_of(path: Path) -> str:
    """Why the file or folder at ``path`` is an error row that nothing reads ("" when it can be read): missing,
    a dangling link, or neither a regular file nor a folder (a FIFO, a socket or a device would block or never
    end)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return DANGLING if path.is_symlink() else "no such file or folder"
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    return "" if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device): not read"


def _escapes(path: Path, inside: Path) -> str:
    """The problem of a link in a batch folder that leads out of it ("" otherwise): a folder of adapters from
    others must not make the batch read the host's files."""
    if not path.is_symlink() or _within(path.resolve(), inside):
        return ""
    return "a link that leads out of the batch folder: refused (copy the file in, or name it in a list or manifest)"


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _text(path: Path) -> str:
    raw = read_bounded(path, MAX_LIST_BYTES, "list file")
    if b"\0" in raw:
        raise BadInput(path, "not a text list of paths (binary content); give a folder, a list file or a "
                             ".csv/.parquet manifest")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadInput(path, "the list file is not UTF-8 text") from None


def _list_file(path: Path) -> list[Entry]:
    lines = [(number, line.strip()) for number, line in enumerate(_text(path).splitlines(), 1)]
    lines = [(number, text) for number, text in lines if text and not text.startswith("#")]
    if len(lines) > MAX_ENTRIES:
        raise BadInput(path, f"more than {MAX_ENTRIES} paths; split the batch")
    literal = {text for _, text in lines}
    entries, ids = [], set()
    for number, text in lines:
        target = _resolve(path, text, f"line {number}")
        entry_id, n = text, 1
        while entry_id in ids or (n > 1 and entry_id in literal):  # a repeated line: text#2, #3, ... never a line's own
            n += 1
            entry_id = f"{text}#{n}"
        ids.add(entry_id)
        entries.append(Entry(entry_id, target, problem=problem_of(target)))
    return entries


def _resolve(manifest: Path, text: str, where: str) -> Path:
    """``text`` as a path: absolute as given, relative to the manifest's folder and not out of it (links followed)."""
    if any(ord(c) < 32 for c in text):
        raise BadInput(manifest, f"{where}: the path has control characters")
    if text.startswith("~"):
        raise BadInput(manifest, f"{where}: '~' is not expanded here; give an absolute path or one relative to the "
                                 "manifest's folder")
    given = Path(text)
    if given.is_absolute():
        return given
    folder = Path(os.path.normpath(manifest.parent.absolute()))
    target = Path(os.path.normpath(folder / given))
    if not _within(target, folder) or not _within(target.resolve(), folder.resolve()):
        raise BadInput(manifest, f"{where}: {text!r} leads out of the manifest's folder (give an absolute path)")
    return target


def _manifest(path: Path, kind: str) -> list[Entry]:
    import pandas as pd

    try:
        if kind == "csv":
            frame = pd.read_csv(io.StringIO(_text(path)), dtype=str, keep_default_na=False, na_filter=False)
        else:
            raw = read_bounded(path, MAX_PARQUET_BYTES, "manifest")
            _check_parquet_size(path, raw)
            frame = pd.read_parquet(io.BytesIO(raw))
    except BadInput:
        raise
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise many types for malformed files
        msg = " ".join(str(exc).split())[:200]
        raise BadInput(path, f"cannot read the {kind.upper()} manifest ({type(exc).__name__}: {msg})") from None
    columns = [str(c).strip().lower() for c in frame.columns]
    unknown = sorted(set(columns) - set(COLUMNS))
    if "path" not in columns or unknown or len(set(columns)) != len(columns):
        why = "no 'path' column" if "path" not in columns else \
            f"unknown column(s) {', '.join(map(repr, unknown))}" if unknown else "a column is named twice"
        raise BadInput(path, f"{why}; a manifest has a 'path' column and optionally {', '.join(COLUMNS[1:])}")
    frame.columns = columns
    if len(frame) > MAX_ENTRIES:
        raise BadInput(path, f"more than {MAX_ENTRIES} rows; split the batch")
    entries, ids = [], set()
    for number, row in enumerate(frame.to_dict("records"), 2):  # line 1 is the column names
        cells = {c: _cell(path, row.get(c), c, number) for c in COLUMNS}
        if not cells["path"]:
            raise BadInput(path, f"row {number}: empty path")
        target = _resolve(path, cells["path"], f"row {number}")
        entry_id = cells["id"] or cells["path"]
        if len(entry_id) > MAX_ID or any(ord(c) < 32 for c in entry_id):
            raise BadInput(path, f"row {number}: the id is longer than {MAX_ID} characters or has control characters")
        if entry_id in ids:
            raise BadInput(path, f"row {number}: id {entry_id!r} is used twice")
        ids.add(entry_id)
        base = resolve_base(cells["base"], relative_to=path.parent) if cells["base"] else None
        if base is not None and base.lab is None:  # a folder: relative to the manifest's folder, and within it
            base = resolve_base(str(_resolve(path, cells["base"], f"row {number}")))
        safety = cells["safety"]
        if safety and safety.lower() != "none":
            safety = str(_resolve(path, safety, f"row {number}"))
        triggers = tuple(t.strip() for t in cells["triggers"].split(";") if t.strip())
        if problem := check_given(triggers):
            raise BadInput(path, f"row {number}: {problem}")
        entries.append(Entry(entry_id, target, safety, base, triggers, problem_of(target)))
    return entries


def _check_parquet_size(path: Path, raw: bytes) -> None:
    """Refuse a Parquet manifest whose columns would decompress past :data:`MAX_LIST_BYTES` (a few KB of gzip can
    hold gigabytes), from the sizes in its metadata, before any column is read."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(io.BytesIO(raw)).metadata
    if meta.num_rows > MAX_ENTRIES or meta.num_row_groups * meta.num_columns > MAX_ENTRIES:
        raise BadInput(path, f"more than {MAX_ENTRIES} rows or column chunks; split the batch")
    size = sum(meta.row_group(g).column(c).total_uncompressed_size
               for g in range(meta.num_row_groups) for c in range(meta.num_columns))
    if size > MAX_LIST_BYTES:
        raise BadInput(path, f"the manifest decompresses to more than {MAX_LIST_BYTES // 2**20} MiB "
                             f"({size:,} bytes); a manifest holds paths and short settings")


def _cell(path: Path, value, column: str, number: int) -> str:
    if value is None or (isinstance(value, float) and value != value):  # missing, or NaN in Parquet
        return ""
    if not isinstance(value, str):
        raise BadInput(path, f"row {number}: column {column!r} holds {type(value).__name__}, expected text")
    return value.strip()
