"""report.json: the stable, documented record of a scan (schema in docs/report-schema.md).

Built from the scan's results only (adapters, static findings, data-free checks, the dynamic
section digested from the run log, the verdict); :func:`refresh` re-derives the dynamic section and
the verdict from a folder's run log, which is what ``auditkit report`` does.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path

from auditkit import __version__
from auditkit.errors import BadInput
from auditkit.fsutil import atomic_write_text
from auditkit.lora.adapter import Adapter
from auditkit.lora.metadata import summarize

SCHEMA = "auditkit.report/2"
TOP_MODULES = 15
MIN_CONTRIBUTION = 0.001  # a module adding under 0.1% to the overall cancellation is not worth listing
REPORT_LIMIT = 64 * 2**20  # a scan of the largest suites writes a few MiB


def read_report(run_dir: str | Path) -> dict:
    """The ``report.json`` of the scan or repair folder ``run_dir``, read bounded and checked by shape (a tampered
    or corrupted file is a one-line :class:`BadInput` naming it)."""
    from auditkit.fsutil import read_json
    from auditkit.records import check
    from auditkit.report.shape import REPORT

    path = Path(run_dir) / "report.json"
    if not path.exists():
        raise BadInput(path, "no report.json: not a scan folder")
    report = read_json(path, "report.json", limit=REPORT_LIMIT)
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise BadInput(path, f"not an auditkit report of schema {SCHEMA}")
    check(path, "a tampered or corrupted report", report, REPORT)
    return report


def adapter_section(adapter: Adapter) -> dict:
    section = adapter.summary()
    section["metadata"] = summarize(adapter.metadata)
    return section


def static_section(scan) -> dict:
    f = scan.findings
    static = f.to_dict()
    static["top_modules"] = [m.name for m in f.modules if m.contribution >= MIN_CONTRIBUTION][:TOP_MODULES]
    static["thresholds"] = scan.thresholds.to_dict()
    static["verdict"] = scan.verdict.verdict
    static["reasons"] = list(scan.verdict.reasons)
    return static


def build_report(candidate: Adapter, safety: Adapter | None, static=None, config=None) -> dict:
    """The report's skeleton; :func:`finish_report` adds the dynamic section and the verdict."""
    return {
        "schema": SCHEMA,
        "auditkit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "verdict": None, "exit_code": None, "reasons": [], "evidence": None,
        "mode": config.mode if config is not None else ("static" if safety is not None else "metadata"),
        "architecture": (safety or candidate).architecture.name,
        "candidate": adapter_section(candidate),
        "safety": adapter_section(safety) if safety is not None else None,
        "base": config.base.name if config is not None and config.base is not None else None,
        "config": config.to_dict() if config is not None else None,
        "static": static_section(static) if static is not None else None,
        "concept_check": None,
        "metadata_evidence": None,
        "triggers": None,
        "dynamic": None,
        "repair": None,
    }


def finish_report(report: dict, dynamic: dict | None, verdict) -> dict:
    """Put the dynamic section and the verdict (:class:`auditkit.verdict.Verdict`) in the report."""
    report["dynamic"] = dynamic
    v = verdict.to_dict()
    report.update(verdict=v["verdict"], exit_code=v["exit_code"], reasons=v["reasons"], evidence=v["evidence"])
    report.update(_finite(report))  # the returned report is what report.json holds: no NaN/Inf
    return report


def refresh(run_dir: Path, show_flagged: bool = False) -> dict:
    """The saved report of ``run_dir`` (:func:`read_report`) with its dynamic section (from the folder's run log)
    and its verdict derived again."""
    from auditkit.config import DynamicThresholds
    from auditkit.report.digest import digest
    from auditkit.runlog import RunLog
    from auditkit.verdict import Verdict, combine

    path = run_dir / "report.json"
    report = read_report(run_dir)
    static = report.get("static")
    evidence = report.get("evidence") or {}
    gathered = evidence.get("gathered") if isinstance(evidence, dict) else None
    try:
        static_v = Verdict(str(static["verdict"]), [str(r) for r in static["reasons"]]) if static else None
        gathered = tuple(str(g) for g in gathered)
    except (KeyError, TypeError):
        raise BadInput(path, "report.json's static or evidence fields are malformed") from None
    dynamic = report.get("dynamic")
    if dynamic:
        # a scan folder holds its run log; a repair folder holds the repaired adapter's in scan-after/
        log = next((RunLog(d) for d in (run_dir, run_dir / "scan-after") if (d / "run.jsonl").is_file()),
                   RunLog(run_dir))
        header = log.header()
        if header is None:
            raise BadInput(log.path, "the run log is missing or empty")
        if not isinstance(header.get("suites"), dict):
            raise BadInput(log.path, "the run log's header records no suites")
        try:
            thresholds = DynamicThresholds(**dynamic.get("thresholds", {}))
        except (TypeError, ValueError) as exc:
            raise BadInput(path, f"dynamic thresholds are malformed ({exc})") from None
        fresh = digest(log.records(), header["suites"], thresholds)
        keep = {k: v for k, v in dynamic.items() if k not in fresh}
        dynamic = {**keep, **fresh, "images": len(log.records()), "show_flagged": show_flagged,
                   "run_log": str(log.path)}
    triggers = report.get("triggers")
    if triggers is not None and not (isinstance(triggers, dict) and isinstance(triggers.get("unprobed", []), list)):
        raise BadInput(path, "report.json's triggers field is malformed")
    check = report.get("concept_check")
    if check is not None and not isinstance(check, dict):
        raise BadInput(path, "report.json's concept_check field is malformed")
    return finish_report(report, dynamic, combine(static_v, dynamic, gathered, triggers, check))


def _finite(obj):
    """JSON has no NaN/Inf: such values become null instead of invalid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_reports(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Render everything in memory first, then write each file atomically."""
    from auditkit.report.html import render_html

    out_dir = Path(out_dir)
    text = json.dumps(_finite(report), indent=2, sort_keys=False, allow_nan=False)
    html = render_html(report)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(out_dir)
    return {
        "json": atomic_write_text(out_dir / "report.json", text + "\n"),
        "html": atomic_write_text(out_dir / "report.html", html),
    }
