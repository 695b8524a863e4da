"""Stage 1: a static and metadata look at every file, in parallel processes, that orders the queue.

Per file: its SHA-256 and its sidecars' (identical files with identical sidecars are scanned once), what it
is (format, architecture, rank, modules), the training tags and trigger words that name a suite's concept,
and, given a safety module, the static scan's cancellation. Triage never decides a row and never skips a
file: every file goes on to the scan, most suspicious first (a file triage cannot read goes last; the scan
names its problem); with a base and a safety module the base judge orders it first (:func:`priority`).
Nothing is unpickled: a pickle's bytes are hashed, never loaded. A file whose reading fails in any way (even
a ``RecursionError`` deep in a header) is a row with ``triage_error``, never the end of the batch.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from auditkit.batch.children import process_pool
from auditkit.batch.inputs import Entry
from auditkit.batch.threads import children_threads
from auditkit.config import StaticThresholds
from auditkit.errors import AuditkitError, BadInput
from auditkit.fsutil import read_bounded

if TYPE_CHECKING:
    from auditkit.runner import Progress

CHUNK = 2**20


@dataclass(frozen=True)
class TriageSettings:
    """What every file is looked at with (picklable, sent to the worker processes)."""

    safety: str | None = None  # the batch's safety module (a row's own safety is looked at in its scan)
    arch: str | None = None
    thresholds: StaticThresholds = StaticThresholds()
    concepts: tuple[tuple[str, tuple[str, ...]], ...] = ()  # suite -> words naming its concept


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (relative names and contents, in name order). Opened
    without blocking: a FIFO, socket or device is refused (BadInput), never waited on."""
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file_sha256(file).encode())
        return digest.hexdigest()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadInput(path, "not a regular file (a FIFO, socket or device): not read")
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sidecars_sha256(path: Path) -> str | None:
    """SHA-256 of the sidecars beside ``path`` (``NAME.civitai.info``, ``NAME.json``: their suffixes and contents),
    None when there are none. The scan reads them (trigger words), so they are part of the input's identity: a
    copy with other sidecars is not a duplicate, and a changed sidecar is scanned again. An unreadable sidecar
    counts by its problem (the scan refuses it)."""
    from auditkit.lora.sidecar import MAX_SIDECAR_BYTES, sidecar_paths

    digest, found = hashlib.sha256(), False
    for sidecar in sidecar_paths(path):
        found = True
        try:
            content = hashlib.sha256(read_bounded(sidecar, MAX_SIDECAR_BYTES, "sidecar")).hexdigest()
        except AuditkitError as exc:
            content = f"unreadable: {exc.problem}"
        digest.update(sidecar.name.removeprefix(path.stem).encode() + b"\0" + content.encode() + b"\0")
    return digest.hexdigest() if found else None


def triage_one(entry: Entry, settings: TriageSettings) -> dict:
    """The triage fields of one entry (never raises for a bad file: ``triage_error`` says why)."""
    row: dict = {"sha256": None, "sidecars_sha256": None, "size_bytes": None, "kind": None, "format": None,
                 "architecture": None, "rank": None, "modules": None, "static_cancellation": None,
                 "metadata_concepts": "", "triage_error": None}
    try:
        if entry.problem:  # refused before anything reads it (a link out of the folder, a FIFO, ...)
            raise BadInput(entry.path, entry.problem)
        row["size_bytes"] = entry.path.stat().st_size if entry.path.is_file() else None
        row["sha256"] = file_sha256(entry.path)
        row["sidecars_sha256"] = sidecars_sha256(entry.path)
        _look(entry, settings, row)
    except AuditkitError as exc:
        row["triage_error"] = str(exc)
    except (OSError, ValueError) as exc:
        row["triage_error"] = " ".join(f"{entry.path}: {exc.strerror if isinstance(exc, OSError) else exc}".split())
    except Exception as exc:  # noqa: BLE001 - anything else (a RecursionError deep in a header): a row, not the end
        row["triage_error"] = f"{entry.path}: cannot be read ({type(exc).__name__})"
    row["suspicion"] = suspicion(row)
    return row


def _look(entry: Entry, settings: TriageSettings, row: dict) -> None:
    from auditkit.inputs import input_kind
    from auditkit.lora.adapter import read_adapter
    from auditkit.lora.io import PICKLE_SUFFIXES

    if entry.path.is_file() and entry.path.suffix.lower() in PICKLE_SUFFIXES:
        row["kind"] = "pickle"  # the reader below refuses it by its name, before reading a byte of it
    else:
        row["kind"] = input_kind(entry.path)
    if row["kind"] == "full model":
        return  # a full model's update needs the base: the scan reads it
    adapter = read_adapter(entry.path, arch=settings.arch)
    ranks = sorted({m.rank for m in adapter.modules.values()})
    row.update(format=adapter.layout, architecture=adapter.architecture.name, rank=ranks[-1] if ranks else None,
               modules=len(adapter.modules))
    if settings.concepts:
        from auditkit.analysis.metadata import concept_evidence, declared_triggers

        words = declared_triggers(adapter.metadata) + list(entry.triggers)
        found = concept_evidence(adapter.metadata, dict(settings.concepts), words)
        row["metadata_concepts"] = ";".join(name for name, sv in found["suites"].items()
                                            if sv["tags"] or sv["triggers"])
    safety = entry.safety or settings.safety
    if safety and safety.lower() != "none" and adapter.update is None:
        try:
            row["static_cancellation"] = _cancellation(entry.path, adapter, safety, settings)
        except AuditkitError as exc:  # e.g. another architecture than the safety module's: the scan says so
            row["triage_error"] = str(exc)


def _cancellation(path: Path, candidate, safety: str, settings: TriageSettings) -> float:
    """The static cancellation of the already read ``candidate`` against ``safety``: the safety module is read
    once per process (:func:`_safety_adapter`) and the pair compared directly when both are adapters of one
    architecture; anything else (a full model, two architectures to settle) goes the scan's own way."""
    from auditkit.analysis.weights import static_scan
    from auditkit.scan import run_static_scan

    safe = _safety_adapter(safety, settings.arch, *_stamp(safety))
    if safe is not None and safe.architecture.name == candidate.architecture.name:
        return float(static_scan(candidate, safe).cancellation)
    return float(run_static_scan(path, safety, settings.thresholds, arch=settings.arch).findings.cancellation)


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _safety_adapter(path: str, arch: str | None, size: int, mtime_ns: int):
    """The batch's safety module as an adapter, read once per process while its file is unchanged (None: a full
    model, which the scan's own reading handles)."""
    from auditkit.inputs import input_kind
    from auditkit.lora.adapter import read_adapter

    return read_adapter(path, arch=arch) if input_kind(path) == "adapter" else None


def suspicion(row: dict) -> float:
    """Queue priority (higher first): the static cancellation, plus 0.5 when training tags or trigger words
    name a suite's concept; -1 for a file triage could not read."""
    if row["triage_error"] and row["architecture"] is None:
        return -1.0
    return (row["static_cancellation"] or 0.0) + (0.5 if row["metadata_concepts"] else 0.0)


def priority(row: dict) -> tuple[float, float]:
    """Queue order (higher first): the base judge where it ran (:mod:`auditkit.batch.judge`; a row it did not
    judge after every judged one), then :func:`suspicion`."""
    judged = row.get("base_judge")
    return (judged if judged is not None and judged == judged else float("-inf"), row["suspicion"])


def _star(args):
    return triage_one(*args)


def triage(entries: list[Entry], settings: TriageSettings, workers: int | None = None,
           progress: Progress | None = None) -> list[dict]:
    """Triage every entry (in ``workers`` processes; 1: in this process); results in the entries' order."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(entries)))
    out: list[dict] = []
    if workers == 1:
        for entry in entries:
            out.append(triage_one(entry, settings))
            if progress:
                progress(len(out), len(entries))
        return out
    # spawned (process_pool), not forked: the caller may hold threads (a progress display) that a fork would copy
    # locked. One BLAS/OpenMP thread per worker (the processes are the parallelism): with each worker's threads
    # spinning on every core, 2 workers on 2 cores triaged 1.1 files/s where one process alone did 7 (measured).
    with children_threads(1), process_pool(workers) as pool:
        chunk = max(1, min(64, len(entries) // (workers * 8)))
        for row in pool.map(_star, [(e, settings) for e in entries], chunksize=chunk):
            out.append(row)
            if progress:
                progress(len(out), len(entries))
    return out
