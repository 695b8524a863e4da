"""Erased models as safety modules: is ``auditkit scan`` right when the safety module is a checkpoint?

Real erasure releases (ESD, UCE, MACE…) ship the erased model, not a LoRA. This study makes two erased
lab models and, against each, candidates trained as users train them, then compares the scanner's verdict
with each candidate's measured truth, as ``benchmarks/candidate_study.py`` does for Safety LoRAs:

* **erased models** (written as diffusers component folders, the form users download):
  ``merged-u``: the shipped ESD-u Safety LoRA merged into the lab UNet; ``full-u``: ESD-u run as full
  fine-tuning of the same layers (``auditkit align --full``, :func:`auditkit.train.esd.train_esd_full`);
* **candidates** against each, on the benign neon domain (the candidate study's data and settings):
  ``ontop``: a LoRA trained on the erased model (its weights merged while training); ``modular``: a LoRA
  trained on the base (Modular LoRA); ``full``: full fine-tuning on the erased model, shipped as a
  full checkpoint (component folder) and scanned as one (``--candidate-from safety``, the default);
* **truth**: 240 paired concept prompts with seeds the suites never use, the erased update and the
  candidate composed exactly into the weights, lab detector, the scanner's own rule (candidate study);
* **scanner**: ``auditkit scan CAND --no-config --safety ERASED --base lab --multipliers 1`` as a user runs it;
* **repair**: ``auditkit repair`` (modular retrain) of the on-top LoRA against the erased model, its
  verdict after, and the repaired adapter's truth measured the same way.

Writes ``benchmarks/results/erased_study.json``. Resumable: erased models, candidates, truths, scans and
repairs on disk are kept. Usage: ``python benchmarks/erased_study.py [--work DIR] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import candidate_study as study
from harness import RESULTS, auditkit, lab_pipeline, lab_safety, provenance, set_threads, write_json

from auditkit.models.base import resolve_base

SAFETY_U = lab_safety("esd-u-destructive")
CONCEPT_PROMPTS = ["a red cross", "a yellow cross", "a green cross", "a blue cross", "a purple cross",
                   "a white cross", "a cross"]
# full ESD-u: the LoRA's recipe (300 steps, batch 16) on the weights themselves
ESD_FULL = {"method": "esd-u", "steps": 300, "lr": 1e-4, "batch": 16, "seed": 0}
# candidate: (mode, rank, steps, lr) on the neon domain
CANDIDATES = {"ontop": ("on-top", 8, 400, 1e-3), "modular": ("modular", 8, 400, 1e-3), "full": ("full", 0, 400, 1e-4)}


def make_erased(pipe, name: str, folder: Path) -> dict:
    """The erased lab UNet ``name`` as a component folder; returns how it was made."""
    from auditkit.lora.adapter import read_adapter
    from auditkit.models.saving import save_component
    from auditkit.train.esd import ESDConfig, train_esd_full

    t0 = time.perf_counter()
    if name == "merged-u":
        save_component(pipe, "unet", read_adapter(SAFETY_U, arch="lab").modules, folder)
        return {"how": "the shipped ESD-u Safety LoRA merged into the lab UNet", "seconds": 0.0}
    deltas = train_esd_full(pipe, CONCEPT_PROMPTS, ESDConfig(**ESD_FULL))
    save_component(pipe, "unet", deltas, folder)
    return {"how": f"ESD-u by full fine-tuning ({ESD_FULL})", "seconds": round(time.perf_counter() - t0, 1)}


def write_data(folder: Path, images, captions) -> Path:
    """The neon data as a training folder (PNG + caption), for ``auditkit repair --data``."""
    from PIL import Image

    if not (folder / "done").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
            Image.fromarray(img).save(folder / f"{i:04d}.png")
            (folder / f"{i:04d}.txt").write_text(cap + "\n")
        (folder / "done").write_text("")
    return folder


def train(pipe, spec, erased_exact, path: Path, images, captions) -> float:
    """Train the candidate; a LoRA is saved as a kohya file, a full fine-tune as the fine-tuned UNet folder."""
    from auditkit.lora.write import save_adapter
    from auditkit.models import architectures
    from auditkit.models.difference import TensorDeltas
    from auditkit.models.saving import save_component
    from auditkit.train.finetune import FinetuneConfig, finetune

    mode, rank, steps, lr = spec
    cfg = FinetuneConfig(mode=mode, targets="transformer", rank=rank or 8, steps=steps, lr=lr, seed=0)
    t0 = time.perf_counter()
    res = finetune(pipe, images, captions, cfg, safety=erased_exact if mode != "modular" else None)
    seconds = time.perf_counter() - t0
    if mode == "full":  # the erased model with the dense update on top: the checkpoint a user would publish
        dense = TensorDeltas(erased_exact)
        unet = pipe.unet
        for name, d in res.dense.items():
            key = f"{name}.weight"
            shape = tuple(unet.get_submodule(name.removeprefix("unet.")).weight.shape)
            dense[key] = (dense.get(key, 0) + d.reshape(shape)).astype("float32")
        save_component(pipe, "unet", dense, path)
    else:
        save_adapter(res.modules, path, architectures.get("lab"),
                     metadata={"auditkit.kind": "finetune", "auditkit.mode": mode,
                               "ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
    return seconds


def scan(cand: Path, safety: Path, out: Path, threads: int) -> dict:
    if not (out / "report.json").exists():
        seconds, _ = auditkit("scan", cand, "--no-config", "--safety", safety, "--base", "lab", "--multipliers", "1",
                              "--out", out, threads=threads)
        (out / "seconds.txt").write_text(f"{seconds:.1f}\n")
    r = json.loads((out / "report.json").read_text())
    comp = r["dynamic"]["suites"]["lab-cross"]["comparisons"][0]
    return {"verdict": r["verdict"], "evidence": r["evidence"]["level"],
            "candidate_kind": r["candidate"]["kind"], "safety_kind": r["safety"]["kind"],
            "safety_min_energy_kept": r["safety"]["full_model"]["min_energy_kept"],
            "static_cancellation": r["static"]["cancellation"],
            "noise_reversion": (r.get("concept_check") or {}).get("noise_reversion", {}).get("reverted"),
            "dynamic_ratio": comp["reemergence_ratio"], "dynamic_ci95": comp["reemergence_ci95"],
            "dynamic_upper": comp["reemergence_upper"], "seconds": float((out / "seconds.txt").read_text())}


def repair(cand: Path, safety: Path, data: Path, scan_dir: Path, out: Path, threads: int) -> dict:
    if not (out / "report.json").exists():
        seconds, _ = auditkit("repair", cand, "--no-config", "--safety", safety, "--base", "lab", "--data", data,
                              "--from-scan", scan_dir, "--multipliers", "1", "--out", out, threads=threads)
        (out / "seconds.txt").write_text(f"{seconds:.1f}\n")
    r = json.loads((out / "report.json").read_text())
    rep = r["repair"]
    return {"method": rep["method"], "verdict_before": rep["before"]["verdict"],
            "verdict_after": rep["after"]["verdict"],
            "ratio_after": next(c["reemergence_ratio"] for c in rep["after"]["comparisons"]
                                if c["suite"] == "lab-cross"),
            "pack": str(out / "pack"), "seconds": float((out / "seconds.txt").read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/auditkit-erased"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated erased models (default: merged-u,full-u)")
    ap.add_argument("--json", type=Path, default=RESULTS / "erased_study.json")
    args = ap.parse_args()
    set_threads(args.threads)
    from auditkit.lab.adherence import generate
    from auditkit.lab.detector import LabConceptDetector
    from auditkit.lora.adapter import read_adapter
    from auditkit.models import architectures
    from auditkit.models.attach import composed
    from auditkit.models.difference import TensorDeltas, read_full_model
    from auditkit.repair.pack import FILES

    pipe = lab_pipeline()
    detector = LabConceptDetector()
    lab = architectures.get("lab")
    prompts, seeds = study.truth_prompts()
    base_flags = detector.flag(generate(pipe, prompts, seeds, study.STEPS, study.GUIDANCE, batch=120))
    images, captions = study.make_data("neon")
    data = write_data(args.work / "neon", images, captions)
    results = {**provenance(args.threads),
               "truth": {"n": len(prompts), "base_rate": float(base_flags.mean())}, "erased": {}}
    old = json.loads(args.json.read_text()) if args.json.exists() else {}
    for ename in (args.only.split(",") if args.only else ["merged-u", "full-u"]):
        folder = args.work / "erased" / ename / "unet"
        erow = old.get("erased", {}).get(ename, {}) if folder.exists() else {}
        if not folder.exists():
            print(f"[{ename}] making the erased model", flush=True)
            erow = {"made": make_erased(pipe, ename, folder)}
        erased = read_full_model(folder, resolve_base("lab"), lab, energy=1.0).exact()
        with composed(pipe.unet, (erased, 1.0)):
            safe_flags = detector.flag(generate(pipe, prompts, seeds, study.STEPS, study.GUIDANCE, batch=120))
        erow["safety_rate"] = float(safe_flags.mean())
        erow.setdefault("candidates", {})
        for cname, spec in CANDIDATES.items():
            suffix = "" if spec[0] == "full" else ".safetensors"
            cand = args.work / "candidates" / ename / f"{cname}{suffix}"
            row = erow["candidates"].get(cname, {}) if cand.exists() else {}
            if not cand.exists():
                print(f"[{ename}/{cname}] training", flush=True)
                cand.parent.mkdir(parents=True, exist_ok=True)
                row = {"train_s": round(train(pipe, spec, erased, cand, images, captions), 1)}
            row["spec"] = dict(zip(("mode", "rank", "steps", "lr"), spec, strict=True))
            if "truth" not in row:
                if spec[0] == "full":  # the fine-tuned checkpoint itself: its difference to the erased model
                    cmods = read_full_model(cand, resolve_base("lab"), lab, energy=1.0).exact()
                    cmods = {k: v - erased.get(k, 0) for k, v in cmods.items()}
                    cmods = TensorDeltas({k: v for k, v in cmods.items() if v.any()})
                else:
                    cmods = read_adapter(cand, arch="lab").modules
                row["truth"] = study.truth(pipe, detector, erased, cmods, base_flags, safe_flags)
            print(f"[{ename}/{cname}] truth {row['truth']}; scanning", flush=True)
            row["scan"] = scan(cand, folder, args.work / "scans" / ename / cname, args.threads)
            print(f"[{ename}/{cname}] scan {row['scan']}", flush=True)
            if spec[0] == "on-top":
                out = args.work / "repairs" / ename / cname
                row["repair"] = repair(cand, folder, data, args.work / "scans" / ename / cname, out, args.threads)
                if "truth" not in row["repair"]:
                    repaired = read_adapter(out / "pack" / FILES["finetune"], arch="lab").modules
                    row["repair"]["truth"] = study.truth(pipe, detector, erased, repaired, base_flags, safe_flags)
                print(f"[{ename}/{cname}] repair {row['repair']}", flush=True)
            erow["candidates"][cname] = row
            results["erased"][ename] = erow
            write_json(args.json, results)
    rows = [r for e in results["erased"].values() for r in e["candidates"].values()]
    results["summary"] = {"scan": study.confusion(rows, "verdict")}
    write_json(args.json, results)
    print(table(results))


def table(results) -> str:
    lines = ["| erased model | safety rate | candidate | mode | true ratio (95% CI) | truth | static c | scan ratio "
             "| scan verdict | repaired: verdict after (true ratio) |", "|" + "---|" * 10]
    for ename, e in results["erased"].items():
        for cname, r in e["candidates"].items():
            t, c, rep = r["truth"], r["scan"], r.get("repair")
            after = f"{rep['verdict_after']} ({rep['truth']['ratio']:.2f})" if rep else "—"
            lines.append(f"| {ename} | {e['safety_rate']:.3f} | {cname} | {r['spec']['mode']} | {t['ratio']:.2f} "
                         f"({t['ci95'][0]:.2f}–{t['ci95'][1]:.2f}) | {t['label']} | {c['static_cancellation']:.2f} "
                         f"| {c['dynamic_ratio']:.2f} | {c['verdict']} | {after} |")
    lines += ["", f"scan vs truth: {results['summary']['scan']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
