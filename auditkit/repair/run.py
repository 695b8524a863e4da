"""``auditkit repair`` as a library call: repair, write the pack, re-scan before and after, report.

Folder layout of a repair (``out``)::

    pack/                 the adapter pack (see :mod:`auditkit.repair.pack`), moved in once re-scanned
    .pack.unverified/     the pack before its verifying re-scan has run (a failed or killed re-scan leaves it)
    checkpoints/          training state of a retrain (resume)
    scan-before/          run log, images and report of the candidate (skipped with --from-scan)
    scan-after/           run log, images and report of the repaired adapter
    report.json/.html     the repaired adapter's report with the ``repair`` section (before/after)

Both scans are :func:`auditkit.scan.scan` with the same settings. Every step is resumable: a
finished retrain is read back from its checkpoint, and both scans continue their run logs, so
running the same command again finishes an interrupted repair.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from auditkit.config import ScanConfig
from auditkit.errors import BadInput
from auditkit.fsutil import replace_folder
from auditkit.models.base import Base
from auditkit.placement import described
from auditkit.repair.retrain import Retraining

UNVERIFIED_PACK = ".pack.unverified"  # the pack until its re-scan has run (then moved to pack/)
if TYPE_CHECKING:  # the type only: the training loop (and numpy) load when a repair trains
    from auditkit.train.loop import StepProgress

    Bars = Callable[[str], tuple[contextlib.AbstractContextManager, StepProgress]]  # a stage's bar: (context, update)


@dataclass
class RepairRequest:
    candidate: Path
    safety: Path
    out: Path
    method: str
    data: Path | None = None
    scan: ScanConfig = field(default_factory=ScanConfig)  # settings of the before/after scans
    suites: list = field(default_factory=list)  # the resolved suites (anchored retraining reads them)
    from_scan: Path | None = None
    threshold: float = 0.5  # Safe LoRA similarity threshold
    train: Retraining = field(default_factory=Retraining)  # what a trained repair is asked for
    clip: object | None = None  # a CLIP detector for fidelity, when configured
    anchors: tuple[Path, ...] = ()  # anchor suite files (anchored, corrected); default: the shipped ones
    fidelity_target: float = 0.9  # auto: a passing repair keeping at least this much ends the search

    def __post_init__(self):
        check_numbers(self.threshold, self.fidelity_target)

    @property
    def base(self) -> Base | None:
        return self.scan.base


def check_numbers(threshold: float, fidelity_target: float) -> None:
    """Refuse (one line) a numeric repair option that is not finite or out of range, before any work: NaN
    compares false with everything, so ``--threshold nan`` ran and projected nothing (the retraining options are
    checked by :class:`Retraining`)."""
    from auditkit.train.lora import check_number

    check_number("--threshold", threshold)
    check_number("--fidelity-target", fidelity_target)
    if not 0 <= fidelity_target <= 1:
        raise BadInput(None, f"--fidelity-target must be in 0..1 (got {fidelity_target!r})")


def _nothing(label):
    return contextlib.nullcontext(), lambda *a: None


def repair(req: RepairRequest, bars: Bars = _nothing, pipe=None) -> dict:
    """Run the whole repair; returns the final report (also written to ``req.out``). ``pipe``: the base
    pipeline already loaded (auto repairs share one)."""
    from auditkit.inputs import input_kind, read_pair
    from auditkit.models.families import family_of_pipeline
    from auditkit.repair import pack as packing
    from auditkit.repair.methods import METHODS
    from auditkit.repair.section import repair_section, scan_summary
    from auditkit.report.build import write_reports
    from auditkit.scan import scan

    if req.method not in METHODS:  # "auto" is auditkit.repair.auto.repair_auto, which calls this per method
        raise ValueError(f"unknown repair method {req.method!r} (one of {', '.join(METHODS)})")
    method = METHODS[req.method]
    anchors = None
    if method.anchored:  # refused before any model loads when the anchors overlap the verification prompts
        from auditkit.repair.anchors import resolve_anchors

        anchors = resolve_anchors(req.suites, req.anchors)
    if input_kind(req.candidate) == "full model":
        raise BadInput(req.candidate, "is a full model: repair takes an adapter candidate; extract its update as a "
                                      "LoRA first (auditkit extract CANDIDATE --base BASE --out CAND.safetensors)")
    extra = req.base.extra_architectures if req.base is not None else ()
    candidate, safety = read_pair(req.candidate, req.safety, req.scan.arch, extra, req.base, energy=req.scan.energy,
                                  candidate_from=req.scan.candidate_from)
    if pipe is None and (req.base is not None or method.needs_data):
        from auditkit.dynamic import load_base
        from auditkit.lab.bases import DEFAULT_BASE
        from auditkit.models.base import resolve_base

        pipe, _, _ = load_base(req.base or resolve_base(DEFAULT_BASE), req.scan.device)
    outcome = method.run(req, pipe, candidate, safety, bars, anchors)
    notes = list(outcome.notes)
    details: dict = {"description": method.description, "candidate": str(req.candidate), "safety": str(req.safety),
                     **outcome.details}
    if anchors is not None:
        details["anchors"] = anchors.to_dict()
        names = ", ".join(s.name for s in anchors.suites)
        notes.append(f"trained on {len(anchors.prompts)} anchor prompts ({names}); verified on the concept suites' "
                     f"prompts ({', '.join(s.name for s in anchors.verification)}), none of which is an anchor")
    # the pack is written into a staging folder named for what it is, and moved to pack/ only once its re-scan
    # has run: a failed or killed re-scan leaves nothing in pack/ that looks like a verified repair
    pack_dir, staged = req.out / "pack", req.out / UNVERIFIED_PACK
    if staged.exists():
        shutil.rmtree(staged)  # a killed run's: written again, identical
    meta = {k: v for k, v in candidate.metadata.items() if k.startswith("ss_")}
    layout = family_of_pipeline(pipe).written_layout if pipe is not None else "kohya"
    details["pack"] = packing.write_pack(staged, outcome.modules, safety, safety.architecture, req.method, meta,
                                         inputs=(req.candidate, req.safety), base=req.base, layout=layout,
                                         final_dir=pack_dir)
    repaired = staged / packing.FILES["finetune"]
    before_dir = req.from_scan or req.out / "scan-before"
    after_dir = req.out / "scan-after"
    scans = {}
    # a reused scan is taken with the trigger search it recorded: searching again (another budget, another
    # version) could find other phrases, and its run log holds the variants it was started with
    searched = _recorded_search(req.from_scan) if req.from_scan else None
    for label, adapter, run_dir in (("scan before", req.candidate, before_dir), ("scan after", repaired, after_dir)):
        config = dataclasses.replace(req.scan, candidate=adapter, safety=req.safety, out=run_dir)
        if label == "scan after":  # the repair keeps the candidate's trigger words: probe it with them too
            config = dataclasses.replace(config, triggers=_trigger_words(scans["scan before"].report, req.scan))
            if config.triggers != req.scan.triggers:
                notes.append(f"the repaired adapter was probed with the candidate's trigger words "
                             f"({', '.join(config.triggers)})")
        phrases = _found_phrases(scans["scan before"].report) if label == "scan after" else None
        if phrases and any(phrases.values()):
            notes.append("the repaired adapter was probed with the phrases the candidate's trigger search found ("
                         + ", ".join(described(p, where) for ps in phrases.values() for p, where in ps) + ")")
        ctx, update = bars(label)
        with ctx:
            scans[label] = scan(config, progress=lambda stage, d, n, u=update: u(d, n, 0.0), pipeline=pipe,
                                write=run_dir != req.from_scan, phrases=phrases,
                                searched=searched if label == "scan before" else None)
    before, after = scans["scan before"].report, scans["scan after"].report
    replace_folder(staged, pack_dir)  # verified: the re-scan ran; its verdict is the report's
    after["candidate"]["path"] = str(pack_dir / packing.FILES["finetune"])
    fidelity = None
    if req.scan.dynamic_enabled:
        fidelity = _fidelity(req, before_dir, after_dir)
    else:
        notes.append("behaviour was not probed (no --base): before/after compare static evidence only")
    details["notes"] = notes
    after["repair"] = repair_section(req.method, scan_summary(before), scan_summary(after), fidelity, details)
    write_reports(after, req.out)
    return after


def _trigger_words(before: dict, settings: ScanConfig) -> tuple[str, ...]:
    """The words the candidate's scan prepended (its file's and the settings'), or the settings' own: the
    repaired file need not carry the candidate's sidecars or modelspec fields."""
    triggers = before.get("triggers") or {}
    return tuple(w["word"] for w in triggers.get("words", [])) if triggers.get("used") else settings.triggers


def _recorded_search(run_dir: Path) -> dict | None:
    """The trigger search the scan in ``run_dir`` recorded in its report, or None (none ran, or a killed scan
    wrote no report: the re-scan searches, and a resumed run with other phrases is refused by its run log)."""
    from auditkit.report.build import read_report

    if not (run_dir / "report.json").exists():
        return None
    return read_report(run_dir).get("trigger_search")


def _found_phrases(before: dict) -> dict[str, list[tuple[str, str]]]:
    """Per concept suite, the (phrase, placement) pairs the candidate's trigger search found and probed: the
    repaired adapter is probed with them first (the same variants, so before and after pair), then with what its
    own search finds."""
    from auditkit.discovery.search import probes

    return {name: probes(d) for name, d in (before.get("trigger_search") or {}).items()}


def _fidelity(req: RepairRequest, before_dir: Path, after_dir: Path) -> dict:
    from auditkit.repair.fidelity import fidelity
    from auditkit.runlog import RunLog

    domain = {s.name for s in req.suites if s.role != "concept"}
    mults = req.scan.multipliers
    config = f"base+safety+candidate@{1.0 if 1.0 in mults else mults[0]:g}"
    lab_detector = None
    if req.base is not None and req.base.lab is not None:  # the lab's own concept detector reads its images
        from auditkit.lab.detector import LabConceptDetector

        lab_detector = LabConceptDetector()
    return fidelity(before_dir, RunLog(before_dir).records(), after_dir, RunLog(after_dir).records(), domain, config,
                    lab_detector=lab_detector, clip=req.clip)


def scan_settings(run_dir: Path) -> dict:
    """Base, suites (files), multipliers, steps and trigger words of an earlier scan, so the repair re-scans
    with the same ones (suite paths as the scan recorded them: absolute for scans since suites record them
    so; a trigger variant names its suite's file, loaded once)."""
    from auditkit.records import check, fields
    from auditkit.runlog import RunLog

    log = RunLog(run_dir)
    header = log.header()  # every field it holds of the type a scan writes, or one line naming it
    if header is None:
        raise BadInput(run_dir, "no run log (run.jsonl) here: not the folder of a dynamic scan")
    check(log.path, "line 1 (the header)", header, fields({}, required=("base", "suites", "multipliers")),
          " (a corrupted run log: scan again)")
    paths = [info.get("path") for info in header["suites"].values()]
    if not all(paths):
        raise BadInput(run_dir, "the scan's run log does not record its suite files")
    if "safety" not in header.get("adapters", {}):
        raise BadInput(run_dir, "the scan was made without a safety module; repair needs one")
    settings = {"base": header["base"], "suites": tuple(dict.fromkeys(str(p) for p in paths)),
                "multipliers": tuple(header["multipliers"]), "steps": header.get("steps_override"),
                "triggers": tuple(str(w) for w in header.get("triggers") or ())}
    from auditkit.config import ScanConfig

    try:  # checked here, so a bad value names the run log it came from, not the command line
        ScanConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise BadInput(log.path, f"line 1 (the header): {exc} (a corrupted run log: scan again)") from None
    return settings
