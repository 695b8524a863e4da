"""Between triage and the scans: the base judge (:mod:`auditkit.analysis.base_judge`) of every file still to scan,
which orders the dynamic queue.

Where a row is scanned against a base and a safety module (the re-emergence mode), the base is loaded once per
(base, device) in this process, each candidate and its safety module are read exactly as ``auditkit scan`` reads
them, and the judge measures how far the candidate's own few-step drawings moved from the safe model's back to the
base's (about 2% of a lab scan). The queue then runs the files whose behaviour changed most first
(:func:`auditkit.batch.triage.priority`). Data-free evidence: it never decides a row and never skips a file; a file
it cannot judge keeps its static place (its scan names the problem). The per-adapter report is what ``auditkit
scan`` writes: the scan's concept check measures the judge again (same seeds, the same number).

Run only on the local engine: a Ray driver may have no accelerator for the base (there the static order stays).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from auditkit.batch.inputs import Entry
from auditkit.config import ScanConfig

if TYPE_CHECKING:
    from auditkit.runner import Progress


def judgeable(entry: Entry, row: dict, scan: ScanConfig) -> bool:
    """Whether the judge applies: a readable, non-duplicate file scanned against a base and a safety module."""
    return (scan.dynamic_enabled and scan.safety is not None and not entry.problem and row["suspicion"] >= 0
            and not row.get("duplicate_of"))


def judge_one(pipe, scan: ScanConfig) -> float | None:
    """The judge's ``value`` for ``scan``'s candidate against its safety module on its first concept suite (None
    when it cannot be measured or the file cannot be read: the scan says why)."""
    from auditkit.analysis.base_judge import base_judge
    from auditkit.models.base import reading_architectures
    from auditkit.scan import read_pair, resolve_suites

    suite = next(s for s in resolve_suites(scan) if s.role == "concept")
    base_arch, extra = reading_architectures(scan.base, pipe)
    candidate, safety = read_pair(scan.candidate, scan.safety, scan.arch, extra, scan.base, base_arch, scan.energy,
                                  scan.candidate_from)
    return base_judge(pipe, suite, candidate, safety).value


def judge_rows(pairs: list[tuple[Entry, dict]], scan_for: Callable[[Entry], ScanConfig],
               progress: Progress | None = None, load: Callable | None = None) -> None:
    """Set ``row["base_judge"]`` for every pair the judge applies to (the others are left as they are).

    Args:
        pairs: (entry, triage row) of the files still to scan.
        scan_for: the settings ``auditkit scan`` gets for an entry (:func:`auditkit.batch.run.scan_config`).
        progress: called with (done, total).
        load: (base, device) -> pipeline; default :func:`auditkit.dynamic.load_base`.
    """
    todo = [(row, scan) for entry, row in pairs if judgeable(entry, row, scan := scan_for(entry))]
    if load is None:
        from auditkit.dynamic import load_base

        def load(base, device):
            return load_base(base, device)[0]

    groups: dict[tuple, list] = {}
    for row, scan in todo:
        groups.setdefault((scan.base, scan.device), []).append((row, scan))
    done = 0
    for (base, device), items in groups.items():
        pipe = load(base, device)
        for row, scan in items:
            try:
                row["base_judge"] = judge_one(pipe, scan)
            except Exception:  # noqa: BLE001 - an unreadable or mismatched file: its scan names the problem
                row["base_judge"] = None
            done += 1
            if progress:
                progress(done, len(todo))
        del pipe  # the workers load their own
