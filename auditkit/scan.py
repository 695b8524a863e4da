"""``auditkit.scan``: the whole scan as one library call, configured by one :class:`ScanConfig`.

The sequence (each stage once, forward only):

1. resolve suites and detectors (everything invalid fails here, before a model loads);
2. read the candidate (and the safety module) into canonical form; static rules when both are given;
3. the candidate's trigger words (:mod:`auditkit.analysis.triggers`: settings, metadata, training tags,
   sidecars beside the file); with ``probe_triggers``, each concept suite gets a trigger variant;
4. with a base: load it once; data-free checks (concept check, noise reversion) when a safety module
   is given; the dynamic scan (re-emergence against the safety module, or amplification against the
   base) unless ``static_only``, every concept suite as written and with the trigger words prepended;
5. metadata evidence (training tags and trigger words naming a suite's concept);
6. the verdict (:mod:`auditkit.verdict`) with the evidence it rests on; report.json + report.html.

The CLI, ``repair``'s before/after scans and the benchmarks all call :func:`scan`.

Example:
    >>> from auditkit import ScanConfig, scan                                    # doctest: +SKIP
    >>> result = scan(ScanConfig(candidate=Path("cand.safetensors"), safety=Path("safety.safetensors"),
    ...                          base="lab", out=Path("reports/cand")))          # doctest: +SKIP
    >>> result.verdict.verdict, result.verdict.evidence                          # doctest: +SKIP
    ('risk', 'behavioural')
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from auditkit.analysis.weights import StaticFindings, static_scan
from auditkit.config import ScanConfig, StaticThresholds
from auditkit.errors import BadInput, Unscannable
from auditkit.fsutil import check_output_folder
from auditkit.inputs import read_input, read_pair, with_base_weights  # noqa: F401 - read_pair: public here too
from auditkit.lora.adapter import Adapter
from auditkit.models.base import DEFAULT_SUITES, Base, reading_architectures
from auditkit.models.families import FAMILIES
from auditkit.runlog import locked
from auditkit.verdict import (
    BEHAVIOURAL,
    CLEAR,
    DATA_FREE,
    EVIDENCE_LEVELS,
    INCONCLUSIVE,
    METADATA,
    STATIC,
    Verdict,
    combine,
    static_verdict,
)

StageProgress = Callable[[str, int, int], None]  # (stage, done, total)
SEARCH_BUDGET_FACTOR = 2.0  # the most the base judge multiplies the trigger search's phrase budget by


@dataclass
class StaticScan:
    candidate: Adapter
    safety: Adapter
    findings: StaticFindings
    verdict: Verdict
    thresholds: StaticThresholds


@dataclass
class ScanResult:
    """What :func:`scan` found: the report (``report.json``'s content), the verdict and its evidence,
    the static scan (None without a safety module) and where the report was written."""

    config: ScanConfig
    report: dict
    verdict: Verdict
    static: StaticScan | None
    out: Path
    paths: dict[str, Path]

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code


def run_static_scan(candidate_path: str | Path, safety_path: str | Path,
                    thresholds: StaticThresholds = StaticThresholds(), arch: str | None = None,
                    extra_architectures: tuple = (), base: Base | None = None, base_arch=None,
                    energy: float | None = None, candidate_from: str = "safety") -> StaticScan:
    """Read both (adapters or full models, see :mod:`auditkit.inputs`) and apply the static rules (factor
    space, no model, seconds)."""
    candidate, safety = read_pair(candidate_path, safety_path, arch, extra_architectures, base, base_arch, energy,
                                  candidate_from)
    try:
        findings = static_scan(candidate, safety)
    except ValueError as exc:
        raise Unscannable(safety_path, str(exc)) from None
    verdict = static_verdict(findings, {"candidate": candidate.coverage.fraction,
                                        "safety": safety.coverage.fraction}, thresholds)
    approximate = [role for role, a in (("candidate", candidate), ("safety", safety))
                   if any(m.needs_base for m in a.modules.values())]
    if approximate and verdict.verdict == CLEAR:  # a DoRA direction is not its update: nothing is cleared
        verdict = Verdict(INCONCLUSIVE, [f"the {' and '.join(approximate)} adapter has DoRA modules whose exact "
                                         "update needs the base weights (give --base); only their low-rank "
                                         "direction was compared", *verdict.reasons])
    return StaticScan(candidate, safety, findings, verdict, thresholds)


def resolve_suites(config: ScanConfig, base: Base | None = None) -> list:
    """The configured suites (or the defaults for the base: :attr:`auditkit.models.base.Base.suites`), with
    detector overrides applied."""
    from auditkit.suites import builtin_dir, load_suites

    base = base if base is not None else config.base
    files = [Path(f) for f in config.suites]
    if not files:
        names = base.suites if base is not None else DEFAULT_SUITES
        files = [builtin_dir() / f"{n}.yaml" for n in names]
    suites = load_suites(files)
    known = {s.name for s in suites}
    for name, _ in config.detectors:
        if name not in known:
            raise BadInput(None, f"detectors: no suite named {name!r} (suites: {', '.join(sorted(known))})")
    anchors = [s for s in suites if s.role == "anchor"]
    if anchors:  # a repair's training prompts: probing them would verify a repair on what it was trained on
        raise BadInput(anchors[0].path, "is an anchor suite (prompts a repair is trained on), not a probe suite")
    suites = [dataclasses.replace(s, detector=config.detector_for(s.name, s.detector)) for s in suites]
    if not any(s.role == "concept" for s in suites):
        raise BadInput(files[0], "no concept suite given: at least one suite must have role 'concept'")
    from auditkit import detectors as registry

    for s in suites:
        registry.check_name(s.detector)
    edits = next((s for s in suites if s.input_image is not None), None)
    if edits is not None and base is not None and base.family.input_image is None:
        editing = ", ".join(f.label for f in FAMILIES.values() if f.input_image)
        raise BadInput(edits.path, f"names an input image, but {base.family.label} pipelines render from text only "
                                   f"(edit families: {editing})")
    return suites


def concept_check(pipe, base: Base, suite, candidate: Adapter, safety: Adapter) -> dict:
    """The data-free checks on the concept suite's prompts: key/value reversion, noise reversion (the velocity
    prediction for flow-matching families) and the base judge (:mod:`auditkit.analysis.base_judge`), for every
    family. Full models take part exactly (their dense differences), never as their truncation. Data-free
    evidence: none of it decides the verdict."""
    from auditkit.analysis.base_judge import base_judge
    from auditkit.analysis.concept import concept_reversion
    from auditkit.analysis.reversion import noise_reversion
    from auditkit.models.pipeline import denoiser_for

    prompts = [p.text for p in suite.prompts]
    kv = denoiser_for(pipe).record.text_kv
    check = concept_reversion(pipe, prompts, suite.concept_word, candidate.exact_modules(kv),
                              safety.exact_modules(kv), encoders=(candidate.exact(), safety.exact())).to_dict()
    check.update({"suite": suite.name, "suite_version": suite.version, "base": str(base), "prompts": len(prompts)})
    check["noise_reversion"] = noise_reversion(pipe, prompts, candidate.exact(), safety.exact()).to_dict()
    check["base_judge"] = base_judge(pipe, suite, candidate, safety).to_dict()
    return check


def metadata_concepts(suites: list) -> dict[str, tuple[str, ...]]:
    """Concept terms per concept suite (its concept word and listed terms)."""
    return {s.name: (s.concept_word, *s.concept_terms) for s in suites if s.role == "concept"}


def gather_triggers(config: ScanConfig, candidate: Adapter, suites: list):
    """The candidate's trigger words (:func:`auditkit.analysis.triggers.gather`): the configured ones, its
    metadata's, its sidecars' (read, or refused, before any model loads) and its training tags' that are not
    words of ``suites`` (every shipped suite when none is configured)."""
    from auditkit.analysis.triggers import gather, vocabulary
    from auditkit.lora.sidecar import read_sidecars

    return gather(candidate.metadata, config.triggers, read_sidecars(config.candidate), vocabulary(suites))


def search_triggers(pipe, suites: list, candidate: Adapter, safety: Adapter | None, config: ScanConfig,
                    progress=None, judged: float | None = None) -> dict:
    """The trigger search (:func:`auditkit.discovery.search.find_triggers`) for every concept suite, within the
    configured budget, twice as many phrases where the base judge (``judged``, data-free) says the candidate's
    behaviour changed: suite name -> :class:`~auditkit.discovery.search.Discovery`."""
    from auditkit.analysis.base_judge import budget_factor
    from auditkit.discovery.search import Budget, find_triggers, fitted
    from auditkit.runner import configurations

    factor = budget_factor(judged, most=SEARCH_BUDGET_FACTOR)
    concept = [s for s in suites if s.role == "concept" and not s.variant_of]
    # the dynamic scan's denoiser evaluations on the concept suites (two a step: classifier-free guidance)
    per_step = 2 * len(configurations(config.multipliers, with_safety=safety is not None))
    scan_evals = sum(len(s.prompts) * s.images_per_prompt * (config.steps or s.steps) * per_step for s in concept)
    out = {}
    for i, s in enumerate(concept):
        if config.steps:  # the search renders as the scan does
            s = dataclasses.replace(s, steps=config.steps)
        budget = fitted(Budget.of(config), s, scan_evals)
        budget = dataclasses.replace(budget, phrases=round(budget.phrases * factor))
        out[s.name] = find_triggers(pipe, s, candidate, safety, budget)
        if factor > 1:
            out[s.name].notes.append(f"the base judge read {judged:.2f}: {factor:.1f}× the phrase budget")
        if progress is not None:
            progress(i + 1, len(concept))
    return out


def run_search(pipe, suites: list, candidate: Adapter, safety: Adapter | None, config: ScanConfig, out: Path,
               ranks, progress=None, judged: float | None = None) -> dict:
    """This run's trigger search (suite name -> its record): read back from the run folder when it was recorded
    there for these settings (a resumed scan searches no more), else searched (:func:`search_triggers`) and
    recorded (:mod:`auditkit.discovery.record`). In a distributed launch rank 0 searches and the other ranks read
    its record after a barrier: every rank probes the same phrases."""
    from auditkit.discovery import record
    from auditkit.discovery.search import Budget

    wanted = record.settings(candidate, safety, config.base, suites, Budget.of(config))
    found = record.load(out, wanted) if ranks.main else None
    if ranks.main and found is None:
        found = {name: d.to_dict() for name, d in
                 search_triggers(pipe, suites, candidate, safety, config, progress, judged).items()}
        record.save(out, wanted, found)
    ranks.barrier()
    if not ranks.main:
        found = record.load(out, wanted)
        if found is None:
            raise BadInput(out / record.FILE, "rank 0 recorded no trigger search for this run's settings")
    return found


def search_summary(config: ScanConfig, search: dict | None, probed: bool) -> dict:
    """The triggers section's ``search`` entry, what the verdict reads: whether the search was on, whether it ran
    and what its probes were (the found phrases' comparisons are rows of the dynamic section)."""
    from auditkit.discovery.search import probes
    from auditkit.placement import described

    if not search:
        return {"enabled": config.trigger_search, "ran": False, "tokens_swept": 0, "phrases_tried": 0, "probed": []}
    return {"enabled": True, "ran": probed, "tokens_swept": sum(d["tokens_swept"] for d in search.values()),
            "phrases_tried": sum(d["phrases_tried"] for d in search.values()),
            "probed": list(dict.fromkeys(p for d in search.values() for p in d["probed"])),
            "placed": list(dict.fromkeys(described(p, where) for d in search.values() for p, where in probes(d))),
            "blind": all(all(sw.get("blind") for sw in d["sweeps"]) for d in search.values())}


def scan(config: ScanConfig, progress: StageProgress | None = None, *, pipeline=None, write: bool = True,
         ranks=None, shared=None, phrases: dict[str, list[tuple[str, str]]] | None = None,
         searched: dict[str, dict] | None = None) -> ScanResult:
    """Run the scan ``config`` describes; write ``report.json``/``report.html`` to its ``out`` folder.

    Args:
        config: the resolved configuration (see :mod:`auditkit.configfile` for files and precedence).
        progress: called with (stage, done, total) while images render.
        pipeline: an already loaded base pipeline to reuse (repair scans twice with one load).
        write: write the report files (False: only return them).
        ranks: this process's share of a distributed launch (:func:`auditkit.distributed.init`).
        shared: the base and base+safety images already rendered for these settings
            (:func:`auditkit.dynamic.render_shared`, as ``auditkit batch`` does once for many candidates):
            taken into the run instead of rendered again; the report is the same.
        phrases: per concept suite, (phrase, placement) pairs to probe first like the trigger search's
            (``NAME+found1``, …; :func:`auditkit.discovery.search.probes`), before
            those the search finds (``repair`` proves a repair on the phrases that called the candidate up).
        searched: the trigger search an earlier scan of the same run recorded (its report's ``trigger_search``):
            taken as it is instead of searching again, so a reused run probes the phrases it was started with
            (``repair --from-scan``), whatever the budget configured now.

    Raises:
        BadInput: a bad input (exit 2); Unscannable: nothing auditkit can analyse (exit 3).
    """
    from auditkit.analysis.metadata import concept_evidence
    from auditkit.report.build import build_report, finish_report, write_reports
    from auditkit.suites import builtin_dir, list_suites, with_found_variants, with_trigger_variants

    if config.candidate is None:
        raise BadInput(None, "no candidate adapter given")
    # validated before any model loads; without a base, configured suites still name the concepts
    # whose words the metadata evidence looks for
    suites = resolve_suites(config) if config.base is not None or config.suites else []
    base_arch, extra = reading_architectures(config.base, pipeline)  # adapters for a custom base read against it
    static = None
    if config.safety is not None:
        static = run_static_scan(config.candidate, config.safety, config.static, arch=config.arch,
                                 extra_architectures=extra, base=config.base, base_arch=base_arch,
                                 energy=config.energy, candidate_from=config.candidate_from)
        candidate, safety = static.candidate, static.safety
    else:
        candidate = read_input(config.candidate, "candidate", config.base, base_arch, config.arch, extra, config.energy)
        safety = None
    shipped = [] if suites else list_suites(builtin_dir())
    triggers = gather_triggers(config, candidate, suites or shipped)
    probed = suites
    if config.dynamic_enabled and config.probe_triggers and triggers.words:
        probed = with_trigger_variants(suites, ", ".join(triggers.words))
    declared = probed
    out = config.out or default_out(config.candidate)
    if write:
        check_output_folder(out)  # a bad --out fails now, not after rendering
    gathered = [METADATA]
    report = build_report(candidate, safety, static, config)
    dynamic = None
    if config.base is not None:
        pipe, ranks = _pipeline(config, pipeline, ranks)
        concept_suite = next(s for s in suites if s.role == "concept")  # resolve_suites guarantees one
        if safety is not None:
            report["concept_check"] = concept_check(pipe, config.base, concept_suite, candidate, safety)
            gathered.append(DATA_FREE)
        if config.dynamic_enabled and searched is not None:
            report["trigger_search"] = searched
        elif config.dynamic_enabled and config.trigger_search:
            judged = ((report.get("concept_check") or {}).get("base_judge") or {}).get("value")
            report["trigger_search"] = run_search(pipe, suites, candidate, safety, config, Path(out), ranks,
                                                  _stage(progress, "trigger search"), judged)
        if config.dynamic_enabled and report.get("trigger_search"):
            from auditkit.discovery.search import probes

            found = {name: list(dict.fromkeys([*(phrases or {}).get(name, ()), *probes(d)]))
                     for name, d in report["trigger_search"].items()}
            probed = with_found_variants(probed, found)
        if config.dynamic_enabled:
            from auditkit.dynamic import run_dynamic

            with locked(out) if ranks.main else contextlib.nullcontext():
                dynamic = run_dynamic(pipe, config.base, candidate, safety, probed, out, config.multipliers,
                                      config.steps, config.batch_size, config.dynamic,
                                      progress=_stage(progress, "dynamic scan"), ranks=ranks,
                                      triggers=triggers.words if declared is not suites else (), shared=shared,
                                      min_coverage=config.static.min_coverage)
            dynamic["show_flagged"] = config.show_flagged
            gathered.append(BEHAVIOURAL)
    if static is not None:
        gathered.append(STATIC)
    report["metadata_evidence"] = concept_evidence(candidate.metadata, metadata_concepts(suites or shipped),
                                                   triggers.words + [x["word"] for x in triggers.left_out])
    report["triggers"] = triggers.section(config.probe_triggers, dynamic is not None and declared is not suites)
    report["triggers"]["search"] = search_summary(config, report.get("trigger_search"), dynamic is not None)
    verdict = combine(static.verdict if static else None, dynamic,
                      tuple(g for g in EVIDENCE_LEVELS if g in gathered), report["triggers"],
                      report.get("concept_check"))  # strongest first
    finish_report(report, dynamic, verdict)
    paths = {}
    if write and (ranks is None or ranks.main):
        try:
            paths = write_reports(report, out)
        except OSError as exc:
            raise BadInput(out, f"cannot write the report ({exc.strerror or exc})") from None
    return ScanResult(config, report, verdict, static, Path(out), paths)


def render_shared_for(config: ScanConfig, run_dir: str | Path, pipeline=None, progress: StageProgress | None = None):
    """Render once what every candidate scanned with ``config`` (its candidate aside) shares: the base and
    base+safety images of its suites (:func:`auditkit.dynamic.render_shared`), read and resolved exactly as
    :func:`scan` reads them. Pass the result to :func:`scan` as ``shared``."""
    from auditkit.dynamic import render_shared

    if not config.dynamic_enabled:
        raise ValueError("shared renders need a base and the dynamic scan")
    suites = resolve_suites(config)
    base_arch, extra = reading_architectures(config.base, pipeline)
    safety = None
    if config.safety is not None:
        safety = read_input(config.safety, "safety module", config.base, base_arch, config.arch, extra, config.energy)
    pipe, _ = _pipeline(config, pipeline, None)
    return render_shared(pipe, config.base, safety, suites, run_dir, config.steps, config.batch_size,
                         progress=_stage(progress, "shared renders"), min_coverage=config.static.min_coverage)


def default_out(candidate: Path) -> Path:
    return Path("reports") / Path(candidate).stem


def _pipeline(config: ScanConfig, pipeline, ranks):
    from auditkit.distributed import Ranks, init
    from auditkit.dynamic import load_base

    if ranks is None:
        ranks = init(config.device) if config.dynamic_enabled else Ranks()
    if pipeline is None:
        pipeline, _, _ = load_base(config.base, config.device or ranks.device)
    return pipeline, ranks


def _stage(progress: StageProgress | None, stage: str):
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


class _CallableModule(types.ModuleType):
    """``auditkit.scan(config)`` keeps working after this module is imported: importing a submodule sets
    the package attribute ``auditkit.scan`` to the module, which replaced the lazily exported function
    (a second ``auditkit.scan(...)`` in one process raised "'module' object is not callable")."""

    def __call__(self, *args, **kwargs) -> ScanResult:
        return scan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
