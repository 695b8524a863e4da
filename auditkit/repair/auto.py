"""``auditkit repair --method auto``: try the repair methods in order of cost, keep the best that passes.

Each method runs as an ordinary repair in ``out/tried/<method>/`` (resumable like any repair), all of them
verified against the same "before" scan (the first method's, or ``--from-scan``). A method is *passing* when
its re-scan's verdict is ``pass``. The search ends at the first passing method that keeps at least
``fidelity_target`` of the candidate's domain (:func:`fidelity_score`), else after every method; the kept one is
the passing method with the highest fidelity (none passing: the best verdict, then the highest fidelity).
Its pack is copied to ``out/pack`` and its report, with a ``repair.auto`` table of every method tried, written
to ``out``. What was not tried is said in the report, never hidden.
"""

from __future__ import annotations

import dataclasses
import shutil

from auditkit.errors import BadInput
from auditkit.fsutil import replace_folder

AUTO = "auto"  # the --method value
VERDICT_RANK = {"pass": 0, "inconclusive": 1, "risk": 2}


def fidelity_score(fidelity: dict | None) -> tuple[float | None, str | None]:
    """The one number auto ranks repairs by, and its name: the lab detector's attribute agreement when
    measured, else CLIP image cosine when configured, else pixel similarity (same prompts and seeds), over the
    domain pairs whose candidate image no detector flagged (there the repair should change nothing; where the
    candidate drew the concept it should), or over all pairs when every one was flagged."""
    if not fidelity or not fidelity.get("pairs"):
        return None, None
    unflagged = fidelity.get("unflagged") or {}
    source, suffix = (unflagged, " (unflagged pairs)") if unflagged.get("pairs") else (fidelity, "")
    for key in ("attributes_agree", "clip_cosine", "pixel_similarity"):
        if source.get(key) is not None:
            return float(source[key]), key + suffix
    return None, None


def candidates(has_data: bool) -> list:
    """The methods auto tries, cheapest first (the registry's order among equal costs)."""
    from auditkit.repair.methods import METHODS

    usable = [m for m in METHODS.values() if has_data or not m.needs_data]
    return sorted(usable, key=lambda m: m.cost)


def _row(method: str, report: dict, folder) -> dict:
    rp = report["repair"]
    score, metric = fidelity_score(rp.get("fidelity"))
    after = rp["after"]
    worst = max((c["reemergence_ratio"] for c in after["comparisons"] if c["reemergence_ratio"] is not None),
                default=None)
    return {"method": method, "verdict": after["verdict"], "fidelity": score, "fidelity_metric": metric,
            "max_reemergence_ratio": worst, "static_cancellation": after["static_cancellation"],
            "folder": str(folder)}


def choose(rows: list[dict]) -> dict:
    """The kept row: passing with the highest fidelity; else the best verdict, then the highest fidelity."""
    return min(rows, key=lambda r: (VERDICT_RANK.get(r["verdict"], 3),
                                    -(r["fidelity"] if r["fidelity"] is not None else -1.0)))


def repair_auto(req, bars) -> dict:
    from auditkit.dynamic import load_base
    from auditkit.repair.run import UNVERIFIED_PACK, repair
    from auditkit.report.build import write_reports

    if not req.scan.dynamic_enabled:
        raise BadInput(None, "--method auto ranks repairs by their re-scans: it needs --base (a dynamic scan)")
    methods = candidates(req.data is not None)
    skipped = {}
    if any(m.anchored for m in methods):
        from auditkit.repair.anchors import resolve_anchors

        try:
            resolve_anchors(req.suites, req.anchors)
        except BadInput as exc:
            if req.anchors:  # the user's own anchors are wrong: say so rather than skip
                raise
            skipped = {m.name: str(exc) for m in methods if m.anchored}
            methods = [m for m in methods if not m.anchored]
    pipe, _, _ = load_base(req.base, req.scan.device)  # loaded once for every method's training and re-scans
    rows, reports = [], {}
    before = req.from_scan
    stopped = None
    for m in methods:
        folder = req.out / "tried" / m.name
        sub = dataclasses.replace(req, method=m.name, out=folder, from_scan=before)
        report = repair(sub, bars, pipe=pipe)
        before = before or folder / "scan-before"
        rows.append(_row(m.name, report, folder))
        reports[m.name] = report
        row = rows[-1]
        if row["verdict"] == "pass" and row["fidelity"] is not None and row["fidelity"] >= req.fidelity_target:
            stopped = m.name
            break
    kept = choose(rows)
    report = reports[kept["method"]]
    staged = req.out / UNVERIFIED_PACK  # a kill while copying leaves no half-copied pack/
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(req.out / "tried" / kept["method"] / "pack", staged)
    replace_folder(staged, req.out / "pack")
    untried = [m.name for m in methods if m.name not in reports]
    skipped_note = [f"{name} not tried: {why}" for name, why in skipped.items()]
    rule = (f"methods tried in order of cost; the search ends at the first that passes its re-scan keeping at least "
            f"{req.fidelity_target:.0%} of the candidate's domain; kept: the passing method with the highest fidelity "
            f"(none passing: the best verdict, then the highest fidelity)")
    report["repair"]["auto"] = {"tried": rows, "kept": kept["method"], "fidelity_target": req.fidelity_target,
                                "stopped_at": stopped, "not_tried": untried, "skipped": skipped, "rule": rule}
    note = (f"auto: tried {', '.join(r['method'] for r in rows)}; kept {kept['method']} "
            f"({kept['verdict']}, fidelity {_pct(kept['fidelity'])})")
    if untried:
        note += f"; not tried: {', '.join(untried)} ({stopped} met the fidelity target)"
    if kept["verdict"] != "pass":
        note += "; no method passed its re-scan"
    report["repair"]["notes"] = [note, *skipped_note, *report["repair"].get("notes", [])]
    write_reports(report, req.out)
    return report


def _pct(x) -> str:
    return "–" if x is None else f"{x:.0%}"
