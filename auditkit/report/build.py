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
    static["reasons"] = list(scan.verdict.reasons)
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


EXIT = {"pass": 0, "risk": 1, "inconclusive": 3}
STATIC_ONLY = ("static evidence only: behaviour was not probed (give --base to probe it); a small weight-space "
               "cancellation can still bring a concept back")


def set_dynamic(report: dict, dynamic: dict | None) -> dict:
    """Put the dynamic section in the report and settle the verdict, reasons and exit code from both scans."""
    from auditkit.report.digest import combine

    static = report["static"]
    report["dynamic"] = dynamic
    if dynamic is None:
        # In the lab, an adapter with weight-space cancellation 0.07 still brought an erased concept
        # back in 66% of images (BENCHMARKS.md): static-only reports say what they did not do.
        verdict, reasons = static["verdict"], [*static["reasons"], STATIC_ONLY]
    else:
        verdict = combine(static["verdict"], dynamic["verdict"])
        reasons = [f"dynamic ({name}, {c['configuration']}): {c['reason']}"
                   for name, sd in dynamic["suites"].items() for c in sd.get("comparisons", [])]
        reasons += [f"static: {r}" for r in static["reasons"]]
    report.update(verdict=verdict, reasons=reasons, exit_code=EXIT[verdict])
    return report


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
