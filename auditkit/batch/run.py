"""``run_batch``: many adapters against one configuration, as one resumable, fault-tolerant job.

1. **Read** the input (folder, list file, manifest: :mod:`auditkit.batch.inputs`) and check the settings;
   every bad input fails here, before anything is written.
2. **Triage** every file in parallel processes (:mod:`auditkit.batch.triage`): hashes, what each file is,
   static cancellation, metadata; it orders the queue (most suspicious first) and never skips a file. With a base
   and a safety module, the base judge (:mod:`auditkit.batch.judge`) orders it first (data-free, local engine).
3. **Deduplicate**: identical files (same SHA-256, same sidecars) with the same settings are scanned once; the
   others' rows say ``duplicate_of``.
4. **Scan** every adapter not finished yet (:mod:`auditkit.batch.state`) on an engine
   (:mod:`auditkit.batch.engines`, :mod:`auditkit.batch.ray_engine`): the base and base+safety images are
   rendered once per group (:mod:`auditkit.shared`), each worker keeps its pipeline loaded, each adapter gets
   the report folder ``auditkit scan`` writes; a bad file is an ``error`` row and the batch goes on.
5. **Write** the results table (Parquet and CSV) and ``index.html``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from auditkit.batch import results as table
from auditkit.batch.inputs import Entry, read_entries
from auditkit.batch.state import BatchState, row_key
from auditkit.batch.triage import TriageSettings, file_sha256, priority, triage
from auditkit.batch.worker import SharedSpec, Task, error_row
from auditkit.config import ScanConfig
from auditkit.configfile import NO_SAFETY
from auditkit.errors import EXIT_INCONCLUSIVE, EXIT_PASS, EXIT_RISK, BadInput
from auditkit.fsutil import check_output_folder
from auditkit.runlog import locked
from auditkit.shared import SharedRenders

ENGINES = ("local", "ray")
BatchProgress = Callable[[str, int, int, dict], None]  # (stage, done, total, rows per verdict so far)


@dataclass(frozen=True)
class BatchConfig:
    """One ``auditkit batch``: the input, the output folder, the scan settings every adapter is scanned
    with (``scan``: a :class:`ScanConfig` without candidate and out), and where the scans run."""

    input: Path
    out: Path
    scan: ScanConfig = ScanConfig()
    engine: str = "local"
    address: str | None = None  # ray: a running cluster ("auto"); None starts a local Ray
    workers: int | None = None  # scan workers (local default 1; ray default one per GPU, else per CPU)
    triage_workers: int | None = None  # triage processes (default: every CPU)
    devices: tuple[str, ...] = ()  # local pool: one device per worker (cuda:0, cuda:1, ...)
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        for name in ("workers", "triage_workers"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 4096:
                raise ValueError(f"{name} must lie in [1, 4096], got {value}")


@dataclass
class BatchResult:
    rows: list[dict]
    counts: dict[str, int]
    paths: dict[str, Path]
    scanned: int  # adapters scanned by this run (not finished before, not duplicates)

    @property
    def exit_code(self) -> int:
        """1 when any adapter is a risk, else 3 when any is inconclusive or an error, else 0."""
        if self.counts.get("risk"):
            return EXIT_RISK
        return EXIT_INCONCLUSIVE if self.counts.get("inconclusive") or self.counts.get("error") else EXIT_PASS


def run_batch(config: BatchConfig, progress: BatchProgress | None = None) -> BatchResult:
    """Scan every adapter ``config.input`` names; write one report folder per adapter, the results table
    and index.html into ``config.out``. Resumable: run it again with the same out folder."""
    config = _absolute(config)
    out = Path(config.out)
    entries = read_entries(config.input, exclude=out)
    entries = [dataclasses.replace(e, path=e.path.absolute()) for e in entries]
    settings = _settings(config)
    _check(config, out, entries)
    engine = _engine(config)
    with engine.connected(), locked(out):  # a cluster that cannot be reached fails before anything is written
        state = BatchState(out)
        state.start(settings)
        rows = _triage(config, entries, progress)
        _deduplicate(entries, rows)
        finished = state.finished()
        _judge(config, out, entries, rows, finished, progress)
        queue = sorted(((e, r) for e, r in zip(entries, rows, strict=True) if not r.get("duplicate_of")),
                       key=lambda er: (_group(config, er[0]), *(-p for p in priority(er[1]))))
        for position, (_, r) in enumerate(queue, 1):
            r["queue_position"] = position
        todo = [(e, r) for e, r in queue if row_key(r) not in finished]
        scanned = _scan(config, out, todo, state, finished, progress, engine)
        finished = state.finished()
        for r in rows:
            r.update({k: v for k, v in finished.get(row_key(r), {}).items() if k not in ("id", "sha256")})
            if not (out / r["report"] / "report.json").is_file():
                r["report"] = None  # a file that could not be scanned has no report
        _copy_duplicates(rows)
        paths = table.write_table(rows, out)
        from auditkit.batch.index import write_index

        paths["index"] = write_index(rows, out)
    return BatchResult(rows, table.counts(rows), paths, scanned)


def _absolute(config: BatchConfig) -> BatchConfig:
    """Every path absolute: workers (Ray actors on other nodes, in other working folders) get the same files."""
    scan = config.scan
    changes: dict = {"suites": tuple(str(Path(s).absolute()) for s in scan.suites)}
    if scan.safety is not None:
        changes["safety"] = Path(scan.safety).absolute()
    if scan.base is not None:
        changes["base"] = scan.base.absolute()  # a lab name is never a path
    return dataclasses.replace(config, input=Path(config.input).absolute(), out=Path(config.out).absolute(),
                               scan=dataclasses.replace(scan, **changes))


def _check(config: BatchConfig, out: Path, entries: list[Entry]) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(out, "output is a file; give a folder")
    if out.is_dir() and not (out / "batch.json").exists() and any(p.name != ".auditkit.lock" for p in out.iterdir()):
        raise BadInput(out, "not a batch folder (no batch.json) and not empty: choose a new or empty --out, or the "
                            "folder of the batch to resume")
    check_output_folder(out)
    _check_rows(config, out, entries)
    _check_bases({b for b in (config.scan.base, *(e.base for e in entries)) if b})
    if config.scan.base is not None and not config.scan.static_only:
        from auditkit.scan import resolve_suites

        resolve_suites(config.scan)  # a bad suite fails now, not once per adapter


def _check_rows(config: BatchConfig, out: Path, entries: list[Entry]) -> None:
    """A row's own settings that a scan would refuse (e.g. its trigger words with the batch's, more than allowed)
    fail now, naming the row, not after triage."""
    for entry in (e for e in entries if e.safety or e.base or e.triggers):
        try:
            scan_config(config, entry, out)
        except ValueError as exc:
            raise BadInput(config.input, f"{entry.id}: {exc}") from None


def _check_bases(bases: set) -> None:
    """Every base is a lab model or a diffusers pipeline folder, checked before ``batch.json`` pins it."""
    for base in sorted(bases, key=str):
        base.check()


def _settings(config: BatchConfig) -> dict:
    """What a resumed batch must share with the first run (the engine and workers may change)."""
    scan = config.scan.to_dict()
    scan.pop("out", None), scan.pop("candidate", None)
    safety = config.scan.safety
    digest = file_sha256(Path(safety)) if safety is not None and Path(safety).is_file() else None
    return {"input": str(Path(config.input).absolute()), "scan": scan, "safety_sha256": digest}


def _triage(config: BatchConfig, entries: list[Entry], progress: BatchProgress | None) -> list[dict]:
    from auditkit.scan import metadata_concepts, resolve_suites

    suites = resolve_suites(config.scan) if config.scan.base is not None or config.scan.suites else []
    safety = str(config.scan.safety) if config.scan.safety is not None else None
    settings = TriageSettings(safety, config.scan.arch, config.scan.static,
                              tuple(metadata_concepts(suites).items()) if suites else ())
    report = (lambda done, total: progress("triage", done, total, {})) if progress else None
    rows = triage(entries, settings, config.triage_workers, report)
    for entry, row in zip(entries, rows, strict=True):
        row.update(id=entry.id, path=str(entry.path), report=f"reports/{entry.folder}", queue_position=None)
    return rows


def _judge(config: BatchConfig, out: Path, entries: list[Entry], rows: list[dict], finished: dict,
           progress: BatchProgress | None) -> None:
    """The base judge of every row still to scan (:mod:`auditkit.batch.judge`, local engine); a finished row keeps
    the judge its scan measured."""
    for r in rows:
        r["base_judge"] = (finished.get(row_key(r)) or {}).get("base_judge")
    if config.engine != "local" or not config.scan.dynamic_enabled:
        return
    from auditkit.batch.judge import judge_rows

    pairs = [(e, r) for e, r in zip(entries, rows, strict=True) if row_key(r) not in finished]
    report = (lambda done, total: progress("base judge", done, total, {})) if progress else None
    judge_rows(pairs, lambda e: scan_config(config, e, out), report)


def _identity(entry: Entry, row: dict) -> tuple | None:
    """What makes two rows the same scan: the file, its sidecars (the scan reads their trigger words) and the
    row's settings."""
    if row["sha256"] is None:
        return None
    return row["sha256"], row["sidecars_sha256"], entry.safety, entry.base, entry.triggers


def _deduplicate(entries: list[Entry], rows: list[dict]) -> None:
    """The first of identical files (same bytes, same row settings) is scanned; the others point to it."""
    first: dict = {}
    for entry, row in zip(entries, rows, strict=True):
        key = _identity(entry, row)
        if key is None:
            continue
        if key in first:
            row["duplicate_of"] = first[key]["id"]
        else:
            first[key] = row


def _copy_duplicates(rows: list[dict]) -> None:
    """A duplicate's row repeats its twin's findings; an error is not repeated (its message names the twin's
    files), the row says where to read it."""
    by_id = {r["id"]: r for r in rows}
    scanned = ("verdict", "exit_code", "evidence", "mode", "reason", "static_cancellation", "base_judge",
               "reemergence_ratio", "increase", "concept_reverted", "images", "error", "report")
    for r in rows:
        if r.get("duplicate_of"):
            twin = by_id[r["duplicate_of"]]
            r.update({k: twin.get(k) for k in scanned})
            if twin.get("error"):
                r["error"] = f"the same file and sidecars as {twin['id']}, which could not be scanned (see its row)"


def scan_config(config: BatchConfig, entry: Entry, out: Path) -> ScanConfig:
    """The settings ``auditkit scan`` would get for this entry: the batch's, with the row's own."""
    changes: dict = {"candidate": entry.path, "out": out / "reports" / entry.folder}
    if entry.safety:
        changes["safety"] = None if entry.safety.lower() == NO_SAFETY else Path(entry.safety)
    if entry.base:
        changes["base"] = entry.base
    if entry.triggers:
        changes["triggers"] = tuple(dict.fromkeys(config.scan.triggers + entry.triggers))
    return dataclasses.replace(config.scan, **changes)


def _group(config: BatchConfig, entry: Entry) -> str:
    """Candidates with the same group share their base and base+safety renders."""
    scan = scan_config(config, entry, Path("."))
    base = str(scan.base) if scan.base is not None else None  # the name, as batch.json records it
    key = {"base": base, "safety": str(scan.safety) if scan.safety else None, "suites": list(scan.suites),
           "steps": scan.steps, "batch_size": scan.batch_size, "detectors": [list(d) for d in scan.detectors],
           "device": scan.device}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _scan(config: BatchConfig, out: Path, todo: list[tuple[Entry, dict]], state: BatchState, finished: dict,
          progress: BatchProgress | None, engine) -> int:
    specs: dict[str, SharedSpec] = {}
    tasks = []
    for entry, row in todo:
        scan = scan_config(config, entry, out)
        if entry.problem:  # refused before anything reads it: an error row, never handed to a scan
            state.record(error_row(Task(entry.id, None, scan), row["triage_error"]))
            continue
        shared = None
        if scan.dynamic_enabled and row["suspicion"] >= 0:  # a file triage cannot read needs no renders
            group = _group(config, entry)
            spec = specs.setdefault(group, SharedSpec(group, scan, out / "shared" / group))
            shared = SharedRenders(spec.run_dir)
        tasks.append(Task(entry.id, row["sha256"], scan, shared, sidecars_sha256=row["sidecars_sha256"]))
    verdicts = table.counts(list(finished.values()))
    done = len(finished)
    total = done + len(tasks)
    if progress:
        progress("scan", done, total, verdicts)
    for _, row in engine.run(list(specs.values()), tasks):
        state.record(row)
        verdicts[row["verdict"]] = verdicts.get(row["verdict"], 0) + 1
        done += 1
        if progress:
            progress("scan", done, total, verdicts)
    return len(tasks)


def _engine(config: BatchConfig):
    if config.engine == "ray":
        from auditkit.batch.ray_engine import RayEngine

        return RayEngine(config.address, config.workers, max_attempts=config.max_attempts)
    from auditkit.batch.engines import LocalEngine

    return LocalEngine(config.workers or 1, config.devices or _local_gpus(config), config.max_attempts)


def _local_gpus(config: BatchConfig) -> tuple[str, ...]:
    """Several workers and several GPUs, no device set: one GPU per worker (round robin)."""
    if (config.workers or 1) == 1 or config.scan.device is not None or not config.scan.dynamic_enabled:
        return ()
    try:
        import torch
    except ImportError:
        return ()
    count = torch.cuda.device_count()
    return tuple(f"cuda:{i}" for i in range(count)) if count > 1 else ()
