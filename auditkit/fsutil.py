"""Atomic file output: a reader never sees a half-written report or adapter.

:func:`check_writable` is called before long work (training), so that a bad output path fails in a
second instead of after the work is done.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from auditkit.errors import BadInput


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def replace_folder(staged: str | Path, final: str | Path) -> Path:
    """Move the finished folder ``staged`` to ``final`` (a sibling), replacing a folder there: a reader finds
    the old folder or the new one, never a half-written one. The old one is moved aside as ``.NAME.old`` and
    removed (a kill in between leaves it there; the next call removes it)."""
    import shutil

    staged, final = Path(staged), Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def append_lines(path: str | Path, lines: list[str]) -> None:
    """Append ``lines`` (each without its newline) to ``path`` and fsync: a log that a kill can cut only at
    its last line. A last line cut by an earlier kill (no newline) is dropped first, so it never joins
    the next line; readers ignore such a line too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                data = path.read_bytes()
                fh.truncate(data.rfind(b"\n") + 1)
    with open(path, "a", encoding="utf-8") as fh:
        for line in lines:
            fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_bounded(path: str | Path, limit: int, what: str = "file") -> bytes:
    """The bytes of the regular file at ``path``, refused past ``limit`` bytes without reading it whole.

    Opened without blocking and checked on the open descriptor: a FIFO or a device (which would block
    or never end) is refused, not read. Every problem is a one-line :class:`BadInput` naming the file.
    """
    import stat

    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise BadInput(path, f"cannot read the {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # checked before fdopen, which refuses a folder with an OSError
        os.close(fd)
        raise BadInput(path, f"the {what} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        try:
            raw = fh.read(limit + 1)
        except OSError as exc:
            raise BadInput(path, f"cannot read the {what} ({exc.strerror or exc})") from None
    if len(raw) > limit:
        raise BadInput(path, f"{what} is larger than {_size(limit)}")
    return raw


def _size(limit: int) -> str:
    return f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit} bytes"


def check_writable(path: str | Path) -> Path:
    """Raise :class:`BadInput` unless a file can be written at ``path`` by :func:`atomic_write_bytes`.

    ``path`` must not be a folder, and its parent must be a writable folder or creatable (its nearest
    existing ancestor is a writable folder). Nothing is left behind: no folder is created, and the
    probe file that tests writability is removed.
    """
    path = Path(path)
    if path.is_dir():
        raise BadInput(path, "output is an existing folder; give a file path")
    ancestor = path.parent
    while not ancestor.exists() and not ancestor.is_symlink():  # a dangling link ends the walk: refused below
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BadInput(path, f"cannot write here: {ancestor} is not a folder")
    _probe(path, ancestor)
    return path


def _probe(path: Path, folder: Path) -> None:
    # os.access() says yes to root on a read-only mount and knows nothing of ACLs: really try.
    try:
        fd, tmp = tempfile.mkstemp(prefix=".auditkit-probe.", suffix=".tmp", dir=folder)
    except OSError as exc:
        why = exc.strerror or exc
        raise BadInput(path, f"cannot write here: the folder {folder} is not writable ({why})") from None
    os.close(fd)
    os.unlink(tmp)


def check_output_folder(folder: str | Path) -> Path:
    """Raise :class:`BadInput` unless reports can be written into ``folder`` (checked before long
    work): it is, or can become, a writable folder, and it is not inside the installed package."""
    import auditkit

    folder = Path(folder)
    package = Path(auditkit.__file__).resolve().parent
    resolved = folder.resolve()
    if resolved == package or package in resolved.parents:
        raise BadInput(folder, "output folder inside the installed auditkit package; choose another --out")
    check_writable(folder / "report.json")
    return folder


# --- untrusted JSON ---------------------------------------------------------------------------------

MAX_JSON_DEPTH = 64  # the deepest real file auditkit reads (kohya's ss_datasets) nests 6 levels
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _first_repeat(pairs: list[tuple[str, object]]) -> str:
    seen: set[str] = set()
    return next(k for k, _ in pairs if k in seen or seen.add(k))


def json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in the JSON text ``raw`` (brackets inside strings do not count).

    Counted without recursion, in fixed-size chunks: a 100 MB header of brackets costs milliseconds and
    a few MB of memory, where :func:`json.loads` would hit Python's recursion limit.
    """
    import numpy as np

    skeleton = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    level = peak = 0
    chunk = 1 << 20
    for start in range(0, len(skeleton), chunk):
        part = np.frombuffer(skeleton, np.uint8, count=min(chunk, len(skeleton) - start), offset=start)
        running = level + np.cumsum(np.where((part == ord("[")) | (part == ord("{")), 1, -1), dtype=np.int64)
        peak, level = max(peak, int(running.max())), int(running[-1])
    return peak


def parse_json(raw: bytes | str, path: str | Path, what: str, *, limit: int, depth: int = MAX_JSON_DEPTH,
               unique: str | None = None) -> object:
    """The untrusted JSON text ``raw`` (UTF-8 bytes, a BOM allowed, or text) as Python data, bounded in size and depth.

    Every problem is a one-line :class:`BadInput` naming ``path`` and saying what ``what`` is: larger than
    ``limit`` bytes, nested deeper than ``depth``, not UTF-8, not JSON (numbers with thousands of digits
    included). ``unique`` names what an object's keys are (``"tensor name"``): given, a key repeated in one
    object is refused ("duplicate tensor name 'x'"; a nested object's repeat is a "duplicate key"), where
    Python would silently keep the last.
    """
    raw = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(raw) > limit:
        raise BadInput(path, f"{what} is larger than {_size(limit)}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadInput(path, f"{what} is not valid JSON: not UTF-8 text") from None
    if json_depth(raw) > depth:
        raise BadInput(path, f"{what} is not valid JSON (nested deeper than {depth} levels)")
    repeats: list[tuple[str, dict]] = []  # (repeated key, its object), innermost objects first

    def pairs(items: list[tuple[str, object]]) -> dict:
        obj = dict(items)
        if len(obj) != len(items):
            repeats.append((_first_repeat(items), obj))
        return obj

    try:
        data = json.loads(text, object_pairs_hook=pairs if unique else None)
    except (ValueError, RecursionError):  # JSONDecodeError; a 5000-digit number
        raise BadInput(path, f"{what} is not valid JSON") from None
    if repeats:
        key, obj = next(((k, o) for k, o in repeats if o is data), repeats[0])
        raise BadInput(path, f"duplicate {unique if obj is data else 'key'} {key!r} in the {what}")
    return data


def read_json(path: str | Path, what: str, *, limit: int, depth: int = MAX_JSON_DEPTH,
              unique: str | None = None) -> object:
    """:func:`parse_json` of the regular file at ``path`` (read with :func:`read_bounded`)."""
    return parse_json(read_bounded(path, limit, what), path, what, limit=limit, depth=depth, unique=unique)
