"""Is the lab detector right on what the models generate? Its flags against labels given by eye.

The lab's concept detector was validated on rendered images (``lab_card.json``). The scanner and every
truth in BENCHMARKS.md apply it to *generated* images, which are blurrier and stranger. Two steps:

1. ``sample``: draws ``--n`` concept-probe images (suite ``lab-cross``, the trigger variants included)
   from the candidate configurations of finished scan run folders (``run.jsonl``), half of them flagged by
   the detector and half not (so both error rates get an interval), shuffles them and writes contact
   sheets (``sheet_K.png``: 48 images each, 4× nearest-neighbour, numbered; no score shown) and
   ``sample.json`` (per number: run, configuration, key, detector score and flag, SHA-256 of the PNG).
2. A person looks at the sheets and writes ``labels.csv`` (``index,label`` with label ``cross`` or ``no``;
   ``unsure`` is allowed and counted apart), without looking at ``sample.json``.
3. ``score``: the detector's and the template judge's (:mod:`auditkit.lab.judge`) agreement with the labels:
   sensitivity and specificity with exact (Clopper-Pearson) intervals, Cohen's kappa; every
   disagreement listed. Writes ``benchmarks/results/detector_validity.json``.

The images are read back from the sheets (every 4 × 4 block is one pixel), so the score needs only the
committed files. Usage::

    python benchmarks/detector_validity.py sample --runs DIR [DIR ...] --out benchmarks/validity [--n 240]
    python benchmarks/detector_validity.py score --out benchmarks/validity
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from pathlib import Path

import numpy as np
from harness import RESULTS, ROOT, emit, provenance

PER_SHEET, COLS, ZOOM, LABEL_H = 48, 8, 4, 14
LABELS = ("cross", "no", "unsure")


def candidates(runs: list[Path]) -> list[dict]:
    """Every concept-probe image of a candidate configuration in the run folders, with its run folder."""
    out = []
    for run in runs:
        for line in (run / "run.jsonl").read_text().splitlines()[1:]:
            r = json.loads(line)
            if "candidate" in r["config"] and r["suite"].startswith("lab-cross") and "lab-cross" in r["flags"]:
                out.append({"run": str(run), "config": r["config"], "key": r["key"], "image": r["image"],
                            "score": r["scores"]["lab-cross"], "flag": r["flags"]["lab-cross"]})
    return out


def sample(args) -> None:
    from PIL import Image, ImageDraw

    pool = candidates(args.runs)
    rng = np.random.default_rng(args.seed)
    flagged = [r for r in pool if r["flag"]]
    clean = [r for r in pool if not r["flag"]]
    k = args.n // 2
    if len(flagged) < k or len(clean) < k:
        raise SystemExit(f"not enough images: {len(flagged)} flagged, {len(clean)} not flagged (need {k} each)")
    chosen = [flagged[i] for i in rng.choice(len(flagged), k, replace=False)]
    chosen += [clean[i] for i in rng.choice(len(clean), args.n - k, replace=False)]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    args.out.mkdir(parents=True, exist_ok=True)
    cell = 32 * ZOOM
    for s in range(0, len(chosen), PER_SHEET):
        part = chosen[s: s + PER_SHEET]
        rows = -(-len(part) // COLS)
        sheet = Image.new("RGB", (COLS * (cell + 4), rows * (cell + LABEL_H + 4)), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for j, r in enumerate(part):
            path = Path(r["run"]) / r["image"]
            r["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            img = Image.open(path).convert("RGB").resize((cell, cell), Image.NEAREST)
            x, y = (j % COLS) * (cell + 4), (j // COLS) * (cell + LABEL_H + 4)
            draw.text((x + 2, y), str(s + j), fill=(0, 0, 0))
            sheet.paste(img, (x, y + LABEL_H))
        sheet.save(args.out / f"sheet_{s // PER_SHEET}.png")
    manifest = {"seed": args.seed, "n": len(chosen), "pool": {"images": len(pool), "flagged": len(flagged)},
                "runs": sorted({r["run"] for r in chosen}), "layout": {"per_sheet": PER_SHEET, "cols": COLS,
                                                                       "zoom": ZOOM, "label_h": LABEL_H},
                "images": [{k: v for k, v in r.items()} for r in chosen]}
    (args.out / "sample.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(chosen)} images on {-(-len(chosen) // PER_SHEET)} sheets in {args.out}")


def images_from_sheets(folder: Path, n: int) -> np.ndarray:
    """The sampled images, read back from the sheets (each 4 × 4 block of a cell is one pixel)."""
    from PIL import Image

    cell = 32 * ZOOM
    out = []
    for i in range(n):
        sheet = np.asarray(Image.open(folder / f"sheet_{i // PER_SHEET}.png").convert("RGB"))
        j = i % PER_SHEET
        x, y = (j % COLS) * (cell + 4), (j // COLS) * (cell + LABEL_H + 4) + LABEL_H
        out.append(sheet[y: y + cell: ZOOM, x: x + cell: ZOOM])
    return np.stack(out)


def rates(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Sensitivity and specificity with Clopper-Pearson 95% intervals, accuracy and Cohen's kappa."""
    from scipy.stats import binomtest

    def share(k, n):
        if n == 0:
            return {"value": None, "k": 0, "n": 0, "ci95": None}
        ci = binomtest(int(k), int(n)).proportion_ci(0.95, method="exact")
        return {"value": k / n, "k": int(k), "n": int(n), "ci95": [ci.low, ci.high]}

    tp, tn = int((pred & truth).sum()), int((~pred & ~truth).sum())
    fp, fn = int((pred & ~truth).sum()), int((~pred & truth).sum())
    n = tp + tn + fp + fn
    if n == 0:
        return {"sensitivity": share(0, 0), "specificity": share(0, 0), "accuracy": share(0, 0), "kappa": None,
                "tp": 0, "tn": 0, "fp": 0, "fn": 0}
    po = (tp + tn) / n
    pe = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / n**2
    return {"sensitivity": share(tp, tp + fn), "specificity": share(tn, tn + fp), "accuracy": share(tp + tn, n),
            "kappa": (po - pe) / (1 - pe) if pe < 1 else None, "tp": tp, "tn": tn, "fp": fp, "fn": fn}


def score(args) -> None:
    from auditkit.lab.detector import LabConceptDetector
    from auditkit.lab.judge import TemplateJudge

    manifest = json.loads((args.out / "sample.json").read_text())
    with open(args.out / "labels.csv", newline="") as f:
        labels = {int(r["index"]): r["label"].strip() for r in csv.DictReader(f)}
    n = manifest["n"]
    if sorted(labels) != list(range(n)) or set(labels.values()) - set(LABELS):
        raise SystemExit(f"labels.csv must label every index 0..{n - 1} with one of {LABELS}")
    images = images_from_sheets(args.out, n)
    sure = np.array([labels[i] != "unsure" for i in range(n)])
    eye = np.array([labels[i] == "cross" for i in range(n)])
    recorded = np.array([m["flag"] for m in manifest["images"]])
    detector = LabConceptDetector().flag(images)
    judge = TemplateJudge().flag(images)
    configs = np.array([m["config"] for m in manifest["images"]])
    results = {**provenance(), "n": n, "unsure": int((~sure).sum()), "eye_cross": int(eye[sure].sum()),
               "sample": {k: manifest[k] for k in ("seed", "pool", "runs")},
               "detector_rescored_from_sheets_agrees_with_run_log": float((detector == recorded).mean()),
               "detector_vs_eye": rates(detector[sure], eye[sure]),
               "template_judge_vs_eye": rates(judge[sure], eye[sure]),
               "detector_vs_template_judge": rates(detector, judge),
               # the verdict compares base+safety+candidate with base+safety; base+candidate is a diagnostic
               "detector_vs_eye_by_configuration": {
                   c: rates(detector[sure & (configs == c)], eye[sure & (configs == c)]) for c in sorted(set(configs))},
               "disagreements": [{"index": i, "eye": labels[i], "detector": bool(detector[i]), "judge": bool(judge[i]),
                                  "score": manifest["images"][i]["score"], "config": manifest["images"][i]["config"],
                                  "run": Path(manifest["images"][i]["run"]).name}
                                 for i in range(n) if sure[i] and (detector[i] != eye[i] or judge[i] != eye[i])]}
    emit(results, RESULTS / "detector_validity.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--runs", type=Path, nargs="+", required=True)
    s.add_argument("--n", type=int, default=240)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "validity")
    c = sub.add_parser("score")
    c.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "validity")
    args = ap.parse_args()
    sample(args) if args.cmd == "sample" else score(args)


if __name__ == "__main__":
    main()
