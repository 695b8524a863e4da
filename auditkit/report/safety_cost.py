"""What the safety module costs on the control suites: base vs base + safety, from the images the scan rendered.

Every scan with a safety module renders each suite under ``base`` and ``base+safety`` with the same jobs (prompt,
seed), so the control suites' images pair row by row. Published erasures keep the rest of the model close to the
base; a safety module that does not (it erased the concept and the colours with it) makes every re-emergence
figure measured against it hard to read. So the report states:

* ``pixel_similarity`` / ``psnr_db``: how far base + safety's images are from the base's (1 − mean |a − b| / 255;
  PSNR in dB), for every detector;
* ``adherence`` (a detector with shape and colour heads: the lab's): the share of images whose detected shape and
  colour are the ones the prompt names, for ``base`` and ``base+safety``, and ``kept``: base + safety's rate as a
  share of the base's.

Reads only the run log's records and the run folder's images (and the detector, for ``adherence``); returns
``{"measured": False, "reason": ...}`` when there is nothing to compare.
"""

from __future__ import annotations

from pathlib import Path

BASE, SAFE = "base", "base+safety"


def safety_cost(records: list[dict], suites: dict[str, dict], run_dir: str | Path, detectors: dict) -> dict:
    """The cost section (module docstring). ``suites``: name -> {"role", "detector"} (the run header's);
    ``detectors``: name -> the loaded detector."""
    from auditkit.images import pixel_metrics
    from auditkit.runlog import load_images

    control = sorted(n for n, s in suites.items() if s.get("role") == "control")
    if not control:
        return {"measured": False, "reason": "no control suite in this scan"}
    configs = {r["config"] for r in records}
    if SAFE not in configs:
        return {"measured": False, "reason": "no safety module in this scan"}
    out: dict = {"measured": True, "suites": control}
    pairs = _pairs(records, set(control))
    if not pairs:
        return {"measured": False, "reason": "no base and base+safety images of the control suites"}
    base = load_images(run_dir, [b for b, _ in pairs])
    safe = load_images(run_dir, [s for _, s in pairs])
    out.update(pairs=len(pairs), **pixel_metrics(base, safe))
    judged = [n for n in control if _has_heads(detectors.get(suites[n].get("detector")))]
    if judged:
        from auditkit.lab.adherence import prompt_adherence

        rows = [i for i, (b, _) in enumerate(pairs) if b["suite"] in judged]
        det = detectors[suites[judged[0]]["detector"]]
        prompts = [pairs[i][0]["prompt"] for i in rows]
        adherence = {BASE: prompt_adherence(det, base[rows], prompts), SAFE: prompt_adherence(det, safe[rows], prompts)}
        out["adherence"] = adherence
        out["adherence_suites"] = judged
        out["kept"] = {h: (adherence[SAFE][h]["rate"] / adherence[BASE][h]["rate"]
                           if adherence[BASE][h]["rate"] else None)
                       for h in adherence[BASE] if h in adherence[SAFE]}
    return out


def _pairs(records: list[dict], suites: set[str]) -> list[tuple[dict, dict]]:
    by = {c: {r["key"]: r for r in records if r["config"] == c and r["suite"] in suites} for c in (BASE, SAFE)}
    return [(by[BASE][k], by[SAFE][k]) for k in sorted(set(by[BASE]) & set(by[SAFE]))]


def _has_heads(detector) -> bool:
    """A detector that says which shape and colour an image shows (the lab's), so adherence can be judged."""
    heads = getattr(detector, "config", {}).get("heads", {}) if detector is not None else {}
    return hasattr(detector, "probabilities") and {"shape", "colour"} <= set(heads)


def summary_line(cost: dict | None) -> str | None:
    """One line for people (terminal, HTML), or None when the report has no cost section (an older report)."""
    if not cost:
        return None
    if not cost.get("measured"):
        return f"not measured ({cost.get('reason', 'no reason recorded')})"
    parts = []
    a = cost.get("adherence") or {}
    parts += [f"{h} adherence {_pct(a[BASE][h].get('rate'))} → {_pct(a[SAFE][h].get('rate'))}"
              for h in ("shape", "colour") if h in a.get(BASE, {}) and h in a.get(SAFE, {})]
    psnr = cost.get("psnr_db")
    parts.append(f"pixel similarity {_pct(cost.get('pixel_similarity'))}, "
                 f"PSNR {'–' if psnr is None else f'{psnr:.1f}'} dB")
    return f"{', '.join(parts)} ({cost.get('pairs', 0)} image pairs of {', '.join(cost.get('suites', []))})"


def _pct(x) -> str:
    return "–" if x is None else f"{x:.1%}"
