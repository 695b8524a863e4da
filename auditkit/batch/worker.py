"""One batch worker: a long-lived holder of a loaded base pipeline that scans candidate after candidate.

Every engine (in-process, a local process pool, Ray actors) runs the same :class:`Worker`: it renders a
group's shared configurations (:func:`auditkit.scan.render_shared_for`) and scans each :class:`Task` with
:func:`auditkit.scan.scan`, its pipeline reused (``scan`` unloads a candidate's adapters before it returns,
also when it fails) and the shared renders taken in. A bad file is an ``error`` row, never an exception.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from auditkit.config import ScanConfig
from auditkit.errors import AuditkitError
from auditkit.shared import SharedRenders


@dataclass(frozen=True)
class SharedSpec:
    """A group of candidates sharing base, safety module and suites: rendered once into ``run_dir``."""

    key: str
    config: ScanConfig  # the group's settings (any candidate's, its candidate aside)
    run_dir: Path


@dataclass(frozen=True)
class Task:
    id: str
    sha256: str | None
    config: ScanConfig  # candidate and out set
    shared: SharedRenders | None = None
    attempt: int = 1
    sidecars_sha256: str | None = None  # part of the adapter's identity (auditkit.batch.triage.sidecars_sha256)


def error_row(task: Task, message: str, exit_code: int = 2) -> dict:
    return {"id": task.id, "sha256": task.sha256, "sidecars_sha256": task.sidecars_sha256, "verdict": "error",
            "exit_code": exit_code,
            "error": " ".join(message.split())[:1000], "attempts": task.attempt}


def result_row(task: Task, report: dict, seconds: float) -> dict:
    """The results table's figures of one report."""
    static = report.get("static") or {}
    dynamic = report.get("dynamic") or {}
    check = report.get("concept_check") or {}
    comparisons = [c for sd in dynamic.get("suites", {}).values() for c in sd.get("comparisons", [])]
    return {"id": task.id, "sha256": task.sha256, "sidecars_sha256": task.sidecars_sha256,
            "verdict": report["verdict"], "exit_code": report["exit_code"],
            "evidence": (report.get("evidence") or {}).get("level"), "mode": report.get("mode"),
            "reason": (report.get("reasons") or [""])[0],
            "static_cancellation": static.get("cancellation"),
            "reemergence_ratio": _max(c.get("reemergence_ratio") for c in comparisons),
            "increase": _max(c.get("increase") for c in comparisons),
            "concept_reverted": check.get("reverted") if check.get("applicable") else None,
            "base_judge": (check.get("base_judge") or {}).get("value"),
            "images": dynamic.get("images"), "error": None, "seconds": round(seconds, 3), "attempts": task.attempt}


def _max(values) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return max(finite) if finite else None


class Worker:
    """Keeps one base pipeline loaded (loaded again only when a task names another base)."""

    def __init__(self, device: str | None = None):
        self.device = device
        self._base = None  # the auditkit.models.base.Base loaded
        self._pipe = None

    def pipeline(self, config: ScanConfig):
        if config.base is None:
            return None
        if self._base != config.base:
            from auditkit.dynamic import load_base

            self._pipe = None  # the old one is freed before the new one loads
            self._pipe, _, _ = load_base(config.base, config.device or self.device)
            self._base = config.base
        return self._pipe

    def render_shared(self, spec: SharedSpec) -> str | None:
        """Render the group's shared configurations; None, or why they could not be rendered (its
        candidates are then scanned on their own, and each names the problem)."""
        from auditkit.runlog import locked
        from auditkit.scan import render_shared_for

        try:
            with locked(spec.run_dir):
                render_shared_for(spec.config, spec.run_dir, pipeline=self.pipeline(spec.config))
        except AuditkitError as exc:
            return str(exc)
        return None

    def scan(self, task: Task) -> dict:
        from auditkit.scan import scan

        start = time.perf_counter()
        try:
            result = scan(task.config, pipeline=self.pipeline(task.config), shared=task.shared)
        except AuditkitError as exc:
            return error_row(task, str(exc), exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - one file must not stop the batch; the row says what happened
            return error_row(task, f"internal error: {type(exc).__name__}: {exc}")
        return result_row(task, result.report, time.perf_counter() - start)
