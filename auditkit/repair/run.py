"""``auditkit repair`` as a library call: repair, write the pack, re-scan before and after, report.

Folder layout of a repair (``out``)::

    pack/                 the adapter pack (see :mod:`auditkit.repair.pack`)
    checkpoints/          training state of a modular retrain (resume)
    scan-before/          run log, images and report of the candidate (skipped with --from-scan)
    scan-after/           run log, images and report of the repaired adapter
    report.json/.html     the repaired adapter's report with the ``repair`` section (before/after)

Every step is resumable: a finished retrain is read back from its checkpoint, and both scans
continue their run logs, so running the same command again finishes an interrupted repair.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from auditkit.config import StaticThresholds
from auditkit.errors import BadInput

Bars = Callable[[str], tuple[contextlib.AbstractContextManager, Callable[[int, int, float], None]]]
DESCRIPTIONS = {
    "modular": "Modular LoRA (Kim et al. 2024): the fine-tuning adapter was retrained on the base model alone, the "
               "safety module frozen and outside the trained update, and is added to the safety module at inference.",
    "anchored": "Anchored retraining (auditkit): the fine-tuning adapter was retrained on top of the merged safety "
                "module with its predictions on the concept prompts pinned to the safe model's, so it could repair "
                "what the safety module damaged in the candidate's domain but not learn the concept back.",
    "sign-aware": "Data-free sign-aware projection: in every module shared with the safety adapter, the part of the "
                  "candidate's update inside the safety update's subspace that does not reinforce it was removed.",
    "safelora": "Data-free Safe LoRA projection (Hsu et al. 2024): modules whose update lies mostly outside the safety "
                "update's column space were replaced by their projection onto it.",
}


@dataclass
class RepairRequest:
    candidate: Path
    safety: Path
    out: Path
    method: str
    data: Path | None = None
    base: str | None = None
    suites: list = field(default_factory=list)
    multipliers: tuple[float, ...] = (1.0,)
    steps: int | None = None
    batch_size: int = 16
    device: str | None = None
    from_scan: Path | None = None
    threshold: float = 0.5  # Safe LoRA similarity threshold
    train: dict = field(default_factory=dict)  # rank, alpha, steps, lr, batch, seed overrides
    clip: object | None = None  # a CLIP detector for fidelity, when configured
    static_thresholds: StaticThresholds = field(default_factory=StaticThresholds)


RETRAINED = ("modular", "anchored")


def _nothing(label):
    return contextlib.nullcontext(), lambda *a: None


def repair(req: RepairRequest, bars: Bars = _nothing, concept_check=None) -> dict:
    """Run the whole repair; returns the final report (also written to ``req.out``)."""
    from auditkit.repair import pack as packing
    from auditkit.repair.algebra import project
    from auditkit.repair.verify import repair_section, summarize
    from auditkit.report.build import build_report, set_dynamic, write_reports
    from auditkit.scan import run_static_scan

    t = req.static_thresholds
    before_static = run_static_scan(req.candidate, req.safety, t)
    candidate, safety = before_static.candidate, before_static.safety
    arch = safety.architecture
    pipe = None
    if req.base is not None or req.method in RETRAINED:
        from auditkit.dynamic import load_base

        pipe, _, _ = load_base(req.base or "lab", req.device)
    notes: list[str] = []
    details: dict = {"description": DESCRIPTIONS[req.method], "candidate": str(req.candidate),
                     "safety": str(req.safety)}
    if req.method in RETRAINED:
        modules, settings = _retrain(req, pipe, candidate, safety, bars)
        notes += list(settings["notes"])
        details["training"] = settings
    else:
        modules, reports = project(candidate.modules, safety.modules, req.method, req.threshold)
        changed = [r for r in reports if r.changed]
        details["projection"] = {"modules_shared": len(reports), "modules_changed": len(changed),
                                 "threshold": req.threshold if req.method == "safelora" else None,
                                 "modules": [r.to_dict() for r in reports]}
        if not changed:
            notes.append("the projection changed no module: the repaired adapter equals the candidate")
    pack_dir = req.out / "pack"
    meta = {k: v for k, v in candidate.metadata.items() if k.startswith("ss_")}
    manifest = packing.write_pack(pack_dir, modules, safety, arch, req.method, meta,
                                  inputs=(req.candidate, req.safety))
    details["pack"] = manifest
    after_static = run_static_scan(pack_dir / packing.FILES["finetune"], req.safety, t)
    before_report, after_report = build_report(before_static), build_report(after_static)
    fidelity = None
    if req.base is not None:
        fidelity = _rescan(req, pipe, before_report, after_report, before_static, after_static, bars, concept_check)
    else:
        set_dynamic(before_report, None)
        set_dynamic(after_report, None)
        notes.append("behaviour was not probed (no --base): before/after compare static evidence only")
    details["notes"] = notes
    after_report["repair"] = repair_section(req.method, summarize(before_report), summarize(after_report),
                                            fidelity, details)
    write_reports(after_report, req.out)
    return after_report


def _retrain(req: RepairRequest, pipe, candidate, safety, bars) -> tuple[dict, dict]:
    from auditkit.repair.retrain import retrain, settings_from
    from auditkit.train.checkpoint import saved_step
    from auditkit.train.data import load_folder

    try:
        settings = settings_from(candidate, **req.train)
    except ValueError as exc:
        raise BadInput(req.candidate, str(exc)) from None
    unet_modules = {n for n, _ in pipe.unet.named_modules()}
    misfit = [n for n in candidate.modules if n.startswith("unet.") and n.split(".", 1)[1] not in unet_modules]
    if misfit:
        raise BadInput(req.candidate, f"{len(misfit)} of its modules are not in the base model's UNet (e.g. "
                                      f"{misfit[0]}): the adapter is for another architecture than --base")
    data = load_folder(req.data, pipe.unet.config.sample_size * pipe.vae_scale_factor)
    ckpt = req.out / "checkpoints" / "finetune.ckpt.safetensors"
    resumed = saved_step(ckpt)
    anchor = None
    if req.method == "anchored":
        anchor = [p.text for s in req.suites if s.role == "concept" for p in s.prompts]
    ctx, update = bars(f"retrain {req.method} ({settings.steps} steps)")
    with ctx:
        result = retrain(pipe, data.images, data.captions, settings, checkpoint=ckpt, progress=update,
                         safety=safety.modules, anchor_prompts=anchor)
    info = settings.to_dict()
    if anchor:
        info["anchor_prompts"] = len(anchor)
    info.update(images=len(data.captions), final_loss=result.losses[-1] if result.losses else None,
                resumed_from_step=resumed, checkpoint=str(ckpt))
    return result.modules, info


def _rescan(req, pipe, before_report, after_report, before_static, after_static, bars, concept_check) -> dict:
    from auditkit.dynamic import run_dynamic
    from auditkit.repair.fidelity import fidelity
    from auditkit.report.build import set_dynamic, write_reports
    from auditkit.runner import RunLog

    before_dir = req.from_scan or req.out / "scan-before"
    after_dir = req.out / "scan-after"
    for label, report, static, run_dir in (("scan before", before_report, before_static, before_dir),
                                           ("scan after", after_report, after_static, after_dir)):
        if concept_check is not None:
            report["concept_check"] = concept_check(pipe, static)
        ctx, update = bars(label)
        with ctx:
            dyn = run_dynamic(pipe, req.base, static.candidate, static.safety, req.suites, run_dir, req.multipliers,
                              req.steps, req.batch_size, progress=lambda d, n, u=update: u(d, n, 0.0))
        pipe.unload_lora_weights()  # the next scan loads its own adapters under the same names
        set_dynamic(report, dyn)
        if run_dir != req.from_scan:
            write_reports(report, run_dir)
    domain = {s.name for s in req.suites if s.role != "concept"}
    config = f"base+safety+candidate@{1.0 if 1.0 in req.multipliers else req.multipliers[0]:g}"
    lab_detector = None
    if req.base == "lab":
        from auditkit.lab.detector import LabConceptDetector

        lab_detector = LabConceptDetector()
    return fidelity(before_dir, RunLog(before_dir).records(), after_dir, RunLog(after_dir).records(), domain, config,
                    lab_detector=lab_detector, clip=req.clip)


def scan_settings(run_dir: Path) -> dict:
    """Suites (files), multipliers and steps of an earlier scan, so the repair re-scans with the same ones."""
    from auditkit.runner import RunLog

    header = RunLog(run_dir).header()
    if header is None:
        raise BadInput(run_dir, "no run log (run.jsonl) here: not the folder of a dynamic scan")
    paths = [info.get("path") for info in header["suites"].values()]
    if not all(paths):
        raise BadInput(run_dir, "the scan's run log does not record its suite files")
    return {"base": header["base"], "suites": [Path(p) for p in paths], "multipliers": tuple(header["multipliers"]),
            "steps": header.get("steps_override")}
