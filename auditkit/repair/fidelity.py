"""Fidelity of a repair: how close the repaired adapter's images stay to the original candidate's.

Both scans render the same jobs (prompt, seed) under ``base+safety+candidate@m``; the candidate's
own domain is every suite whose role is not ``concept``. Pairs of images with the same job key are
compared from the two run folders (no model needed):

* ``pixel``: 1 − mean |a − b| / 255 and PSNR (dB);
* ``attributes`` (the lab): share of pairs whose detected shape, colour and style all agree;
* ``clip``: mean cosine of CLIP image embeddings (when a CLIP model with local weights is given).

The same metrics are also given over the pairs whose "before" image no detector flagged (``unflagged``): where
the candidate drew the concept on a prompt of its own domain, a repair is meant to change the image, so those
pairs measure the repair's purpose, not a loss of fidelity. :func:`auditkit.repair.auto.fidelity_score` ranks
repairs on the unflagged pairs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from auditkit.images import pixel_metrics
from auditkit.runlog import load_images


def pairs(before: list[dict], after: list[dict], config: str, suites: set[str]) -> list[tuple[dict, dict]]:
    """Records of the same job (key) in ``config`` in both runs, for the given suites, in key order."""
    a = {r["key"]: r for r in before if r["config"] == config and r["suite"] in suites}
    b = {r["key"]: r for r in after if r["config"] == config and r["suite"] in suites}
    return [(a[k], b[k]) for k in sorted(set(a) & set(b))]


def attribute_agreement(detector, a: np.ndarray, b: np.ndarray) -> dict:
    pa, pb = detector.predict(a), detector.predict(b)
    same = [x == y for x, y in zip(pa, pb, strict=True)]
    heads = sorted(pa[0]) if pa else []
    out = {"attributes_agree": float(np.mean(same)) if same else float("nan")}
    for h in heads:
        out[f"{h}_agrees"] = float(np.mean([x[h] == y[h] for x, y in zip(pa, pb, strict=True)]))
    return out


def clip_similarity(clip, a: np.ndarray, b: np.ndarray) -> dict:
    ea, eb = clip.embed(a), clip.embed(b)
    return {"clip_cosine": float(np.mean(np.sum(ea * eb, axis=1)))}


def fidelity(before_dir: str | Path, before: list[dict], after_dir: str | Path, after: list[dict],
             suites: set[str], config: str, lab_detector=None, clip=None) -> dict:
    """Fidelity metrics over the domain suites' image pairs of ``config``."""
    matched = pairs(before, after, config, suites)
    if not matched:
        return {"configuration": config, "pairs": 0, "suites": sorted(suites)}
    a = load_images(before_dir, [x for x, _ in matched])
    b = load_images(after_dir, [y for _, y in matched])
    out = {"configuration": config, "pairs": len(matched), "suites": sorted(suites),
           **_metrics(a, b, lab_detector, clip)}
    clean = np.array([not any((x.get("flags") or {}).values()) for x, _ in matched])
    out["unflagged"] = {"pairs": int(clean.sum())}
    if clean.any():
        out["unflagged"].update(_metrics(a[clean], b[clean], lab_detector, clip))
    return out


def _metrics(a: np.ndarray, b: np.ndarray, lab_detector, clip) -> dict:
    out = pixel_metrics(a, b)
    if lab_detector is not None:
        out.update(attribute_agreement(lab_detector, a, b))
    if clip is not None:
        out.update(clip_similarity(clip, a, b))
    return out
