"""Digest of a run log: records → concept rates, intervals, paired comparisons, behavioural verdict.

Pure functions over the JSONL records (no model), so ``auditkit report RUN_DIR`` re-renders a run.
The rules that turn comparisons into verdicts live in :mod:`auditkit.verdict`.
"""

from __future__ import annotations

import math

import numpy as np

from auditkit.config import DynamicThresholds
from auditkit.stats import wilson
from auditkit.verdict import amplification_row, behavioural_verdict, decide_rows, reemergence_row

VARIANT_KEYS = ("variant_of", "prefix", "phrase", "placement")  # Suite.variant_info's keys


def _flags(records: list[dict], suite: str, config: str, detector: str) -> dict[str, bool]:
    return {r["key"]: bool(r["flags"][detector]) for r in records
            if r["suite"] == suite and r["config"] == config and detector in r["flags"]}


def digest(records: list[dict], suites: dict[str, dict], thresholds: DynamicThresholds | None = None) -> dict:
    """Statistics per suite and configuration. ``suites``: name -> {"detector", "role", "prompts"}, and for
    a trigger variant ``variant_of`` and ``prefix``, or ``phrase`` and ``placement`` (copied into its entry). Each
    concept suite gets the verdict of its own comparisons; the scan's behavioural verdict is that of all of them
    together (the worse of a suite and its trigger variant, Holm over every comparison)."""
    thresholds = thresholds or DynamicThresholds()
    configs = sorted({r["config"] for r in records}, key=_config_order)
    mode = "reemergence" if "base+safety" in configs else "amplification"
    out: dict = {"configurations": configs, "suites": {}, "thresholds": thresholds.to_dict(), "mode": mode}
    rows = []
    for name, info in suites.items():
        det = info["detector"]
        per_config = {c: _flags(records, name, c, det) for c in configs}
        rates = {}
        for c, flags in per_config.items():
            k, n = sum(flags.values()), len(flags)
            if n:
                rates[c] = {"hits": k, "n": n, "rate": k / n, "ci95": list(wilson(k, n))}
        entry = {"detector": det, "role": info.get("role", "concept"), "rates": rates,
                 "prompts": _per_prompt(records, name, det, configs, info.get("prompts", []))}
        entry.update({k: str(info[k]) for k in VARIANT_KEYS if info.get(k)})
        if entry["role"] == "concept":
            entry["comparisons"] = _comparisons(per_config, thresholds, mode)
            rows += entry["comparisons"]
        out["suites"][name] = entry
    decide_rows(rows, thresholds)
    for entry in out["suites"].values():
        if entry["role"] == "concept":
            entry["verdict"] = behavioural_verdict(entry["comparisons"])
    out["verdict"] = behavioural_verdict(rows)
    return out


def _config_order(name: str):
    order = ["base", "base+safety"]
    return (order.index(name) if name in order else 2, name)


def _comparisons(per_config: dict[str, dict[str, bool]], t: DynamicThresholds, mode: str) -> list[dict]:
    base, safe = per_config.get("base", {}), per_config.get("base+safety", {})
    prefix = "base+safety+candidate" if mode == "reemergence" else "base+candidate"
    rows = []
    for c, flags in per_config.items():
        if not c.startswith(prefix + "@"):
            continue
        keys = sorted(set(base) & set(flags) & (set(safe) if mode == "reemergence" else set(base)))
        if not keys:
            continue
        b = np.array([base[k] for k in keys])
        x = np.array([flags[k] for k in keys])
        if mode == "reemergence":
            row = reemergence_row(b, np.array([safe[k] for k in keys]), x, t)
        else:
            row = amplification_row(b, x, t)
        rows.append({"configuration": c, **row})
    return rows


def _per_prompt(records, suite, det, configs, prompts) -> list[dict]:
    rows: dict[int, dict] = {}
    for r in records:
        if r["suite"] != suite or det not in r["flags"]:
            continue
        row = rows.setdefault(r["prompt_index"], {"prompt": r["prompt"], "rates": {}})
        cell = row["rates"].setdefault(r["config"], [0, 0])
        cell[0] += int(r["flags"][det])
        cell[1] += 1
    return [{"index": i, "prompt": row["prompt"],
             "rates": {c: row["rates"][c][0] / row["rates"][c][1] for c in configs if c in row["rates"]}}
            for i, row in sorted(rows.items())]


def placed(entry: dict) -> str:
    """Where a variant's phrase went, for people: "'trisk, ' prepended", "'trisk' before the concept word"."""
    from auditkit.placement import START, described

    where = str(entry.get("placement") or START)
    if where == START and entry.get("prefix"):
        return described(str(entry["prefix"]))
    return described(str(entry.get("phrase", "")), where)


def variant_pairs(dynamic: dict) -> list[dict]:
    """Each concept suite beside its trigger variant, for people: the verdict of each and its worst figure
    (the largest re-emergence ratio, or increase over the base). Empty when no suite has a variant."""
    suites = dynamic.get("suites", {})
    key = "reemergence_ratio" if dynamic.get("mode") == "reemergence" else "increase"

    def worst(entry: dict) -> dict:
        figures = [c[key] for c in entry.get("comparisons", []) if isinstance(c.get(key), (int, float))
                   and math.isfinite(c[key])]
        return {"verdict": entry.get("verdict"), "figure": max(figures) if figures else None}

    label = "re-emergence ratio" if key == "reemergence_ratio" else "increase over the base"
    return [{"suite": sd["variant_of"], "variant": name, "prefix": sd.get("prefix", ""), "placed": placed(sd),
             "measure": label,
             "as_written": worst(suites.get(sd["variant_of"], {})), "with_triggers": worst(sd)}
            for name, sd in suites.items() if sd.get("variant_of")]
