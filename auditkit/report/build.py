"""report.json: the stable, documented record of a scan (schema in docs/report-schema.md)."""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path

from auditkit import __version__
from auditkit.fsutil import atomic_write_text
from auditkit.lora.adapter import Adapter
from auditkit.lora.metadata import summarize
from auditkit.scan import StaticScan

SCHEMA = "auditkit.report/1"
TOP_MODULES = 15
MIN_CONTRIBUTION = 0.001  # a module adding under 0.1% to the overall cancellation is not worth listing


def adapter_section(adapter: Adapter) -> dict:
    section = adapter.summary()
    section["metadata"] = summarize(adapter.metadata)
    return section


def build_report(scan: StaticScan) -> dict:
    f = scan.findings
    static = f.to_dict()
    static["top_modules"] = [m.name for m in f.modules if m.contribution >= MIN_CONTRIBUTION][:TOP_MODULES]
    static["thresholds"] = scan.thresholds.to_dict()
    static["verdict"] = scan.verdict.verdict
    return _finite({
        "schema": SCHEMA,
        "auditkit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "verdict": scan.verdict.verdict,
        "exit_code": scan.verdict.exit_code,
        "reasons": scan.verdict.reasons,
        "architecture": scan.safety.architecture.name,
        "candidate": adapter_section(scan.candidate),
        "safety": adapter_section(scan.safety),
        "static": static,
        "concept_check": None,
        "dynamic": None,
        "repair": None,
    })


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
    text = json.dumps(report, indent=2, sort_keys=False, allow_nan=False)
    html = render_html(report)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(out_dir)
    return {
        "json": atomic_write_text(out_dir / "report.json", text + "\n"),
        "html": atomic_write_text(out_dir / "report.html", html),
    }
