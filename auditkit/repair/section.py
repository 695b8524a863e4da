"""The repair section of a report: before/after summaries from the two scan reports (pure: dicts in,
dict out). The evidence itself is the two scans; this module only lays it side by side."""

from __future__ import annotations


def scan_summary(report: dict) -> dict:
    """The numbers a before/after table needs from one scan report."""
    s = report["static"]
    out = {"verdict": report["verdict"], "static_verdict": s["verdict"], "static_cancellation": s["cancellation"],
           "energy_in_safety_subspace": s["energy_in_safety_subspace"], "adapter_sha256": report["candidate"]["sha256"],
           "concept_check": None, "noise_reversion": None, "comparisons": []}
    cc = report.get("concept_check")
    if cc and cc.get("applicable"):
        out["concept_check"] = cc["reverted"]
    if cc and cc.get("noise_reversion"):
        out["noise_reversion"] = cc["noise_reversion"]["reverted"]
    dyn = report.get("dynamic")
    if dyn:
        out["dynamic_verdict"] = dyn["verdict"]
        for suite, sd in dyn["suites"].items():
            for c in sd.get("comparisons", []):
                out["comparisons"].append({
                    "suite": suite, "variant_of": sd.get("variant_of", ""), "prefix": sd.get("prefix", ""),
                    "phrase": sd.get("phrase", ""), "placement": sd.get("placement", ""),
                    "configuration": c["configuration"],
                    "pairs": c["pairs"],
                    "rate_safety": c["rate_safety"], "rate_candidate": c["rate_candidate"],
                    "reemergence_ratio": c["reemergence_ratio"], "reemergence_ci95": c["reemergence_ci95"],
                    "reemergence_upper": c.get("reemergence_upper"),
                    "verdict": c["verdict"]})
    return out


def repair_section(method: str, before: dict, after: dict, fidelity: dict | None, details: dict) -> dict:
    """report["repair"]: the method, what it did, and the evidence before and after it."""
    rows = []
    # rows pair on the same prompts (suite, and the phrase and where it went), whatever the variant is called: the
    # candidate's found phrase is a trigger word of the repaired adapter's scan, whose own search may probe another
    def prompts(c: dict) -> tuple:
        return (c.get("variant_of") or c["suite"], c.get("prefix", ""), c.get("phrase", ""), c.get("placement", ""),
                c["configuration"])

    keyed = {prompts(c): c for c in before["comparisons"]}
    for c in after["comparisons"]:
        b = keyed.get(prompts(c))
        if b is not None:
            rows.append({"suite": c["suite"], "configuration": c["configuration"], "before": b, "after": c})
    return {"method": method, "before": before, "after": after, "comparisons": rows, "fidelity": fidelity,
            **details}
