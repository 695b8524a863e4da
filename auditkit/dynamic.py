"""The dynamic scan as a library call: suites rendered under every configuration, scored, digested."""

from __future__ import annotations

import contextlib
from importlib import metadata
from pathlib import Path

from auditkit import __version__
from auditkit.config import DynamicThresholds, StaticThresholds
from auditkit.distributed import Ranks
from auditkit.lora.adapter import Adapter
from auditkit.models.attach import load_adapters, unload_adapters
from auditkit.models.base import Base
from auditkit.report.digest import digest
from auditkit.runlog import RunLog
from auditkit.runner import configurations, plan, run, variants_with_the_safety_module
from auditkit.shared import SHARED_CONFIGS, SharedRenders
from auditkit.suites import Suite

LIBRARIES = ("torch", "diffusers", "transformers", "peft", "nudenet", "open_clip_torch", "numpy", "scipy")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"auditkit": __version__}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def pick_device(device: str | None) -> tuple[str, str]:
    """(device, dtype name): CUDA in bf16/fp16 when present, CPU in fp32 otherwise; overridable."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return device, "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return device, "float32"


def suites_info(suites: list[Suite]) -> dict[str, dict]:
    """What the run log's header records of each suite; a trigger variant also records the suite it was
    made from and where its phrase went (:meth:`~auditkit.suites.Suite.variant_info`; plain suites' entries are as
    before, so older runs still resume)."""
    info = {}
    for s in suites:
        info[s.name] = {"detector": s.detector, "role": s.role, "version": s.version, "path": s.path,
                        "concept": s.concept_word, "prompts": len(s.prompts), "sha256": s.sha256}
        info[s.name].update(s.variant_info())
        if s.input_image is not None:
            info[s.name]["input_image"] = s.input_image.describe()
    return info


def truncated_prompts(pipe, suites: list[Suite]) -> dict[str, int]:
    """Per suite, how many prompts are longer than the (first) text encoder reads, and so were cut: a
    trigger variant's prefix can push a prompt's end, the concept word included, past the limit (77 CLIP
    tokens; 16 in the lab)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return {}
    limit = tokenizer.model_max_length
    out = {}
    for s in suites:
        lengths = [len(ids) for ids in tokenizer([p.text for p in s.prompts])["input_ids"]]
        if any(n > limit for n in lengths):
            out[s.name] = sum(n > limit for n in lengths)
    return out


def load_base(base: Base, device: str | None = None, full_precision: bool = False):
    """(pipeline, device, dtype name) for ``base`` (:class:`~auditkit.models.base.Base`) on the chosen device,
    loaded once per scan or training.
    ``full_precision``: float32 on a GPU too (training the model's own weights; a LoRA trains in float32 on a
    bf16 model, :func:`auditkit.train.lora.add_lora`)."""
    import torch

    device, dtype = pick_device(device)
    if full_precision:
        dtype = "float32"
    return base.load(device=device, dtype=getattr(torch, dtype)), device, dtype


@contextlib.contextmanager
def loaded(pipe, adapters: dict[str, Adapter], min_coverage: float = StaticThresholds.min_coverage):
    """The scan's adapters loaded into ``pipe``: yields (coverage, LoRA roles, the full models' Overlay or
    None); a LoRA of which diffusers applies less than ``min_coverage`` is refused (Unscannable). On leaving,
    also when loading fails part-way (a safety module loaded, then a candidate refused),
    the pipeline is put back as it came, so a pipeline reused for the next candidate holds nothing of this
    one."""
    loras = {role: a for role, a in adapters.items() if a.update is None}
    full = {role: a for role, a in adapters.items() if a.update is not None}
    overlay = None
    try:
        coverage = load_adapters(pipe, loras, min_coverage)
        if full:  # full models are rendered as themselves: every changed tensor written per configuration
            from auditkit.models.overlay import Overlay

            overlay = Overlay(pipe, full)
            coverage.update(overlay.coverage())
        yield coverage, list(loras), overlay
    finally:
        if overlay is not None:
            overlay.restore()
        unload_adapters(pipe)  # the pipeline is left as it came: a later scan loads its own adapters


def _header(base: Base, suites: list[Suite], multipliers, steps: int | None, adapters: dict[str, Adapter],
            detectors: dict, triggers) -> dict:
    header = {  # the base as the user named it: older run logs resume
        "base": str(base), "suites": suites_info(suites), "multipliers": list(multipliers), "steps_override": steps,
        "adapters": {role: a.sha256 for role, a in adapters.items()},
        "detectors": {n: d.profile() for n, d in detectors.items()},
        "seeds": "image k of a prompt uses seed prompt.seed * 1000 + k",
    }
    if triggers:  # absent without triggers: a run started before trigger variants existed still resumes
        header["triggers"] = list(triggers)
    full = {role: a for role, a in adapters.items() if a.update is not None}
    if full:  # what each full model's update is relative to changes what its configurations render
        header["full_models"] = {role: a.update.rendered_label for role, a in full.items()}
    return header


def render_settings(pipe, batch_size: int) -> dict:
    """What, besides the run log's header, decides a rendered image's exact pixels."""
    from auditkit.models.pipeline import denoiser_of

    denoiser = denoiser_of(pipe)
    return {"batch_size": batch_size, "device": str(denoiser.device),
            "dtype": str(denoiser.dtype).removeprefix("torch.")}


def render_shared(pipe, base: Base, safety: Adapter | None, suites: list[Suite], run_dir: str | Path,
                  steps: int | None = None, batch_size: int = 16, progress=None,
                  min_coverage: float = StaticThresholds.min_coverage) -> SharedRenders:
    """Render the configurations every candidate shares (base, and base+safety with a safety module) once,
    into ``run_dir`` (resumable); :meth:`SharedRenders.seed` puts them into a candidate's run log, so that
    :func:`run_dynamic` renders only the candidate's configurations. See :mod:`auditkit.shared`."""
    from auditkit import detectors as registry

    detectors = {name: registry.get(name) for name in sorted({s.detector for s in suites})}
    adapters = {"safety": safety} if safety is not None else {}
    configs = [c for c in configurations((1.0,), with_safety=safety is not None) if c.name in SHARED_CONFIGS]
    header = {**_header(base, suites, (), steps, adapters, detectors, ()), "shared": [c.name for c in configs],
              "render": render_settings(pipe, batch_size)}
    with loaded(pipe, adapters, min_coverage) as (_, roles, overlay):
        RunLog(run_dir).start(header)
        run(pipe, plan(suites, steps), configs, detectors, run_dir, roles=roles, batch_size=batch_size,
            progress=progress, overlay=overlay)
    return SharedRenders(Path(run_dir))


def run_dynamic(pipe, base: Base, candidate: Adapter, safety: Adapter | None, suites: list[Suite],
                run_dir: str | Path, multipliers: tuple[float, ...] = (0.5, 1.0, 1.5), steps: int | None = None,
                batch_size: int = 16, thresholds: DynamicThresholds | None = None, progress=None,
                ranks: Ranks | None = None, triggers: list[str] | tuple[str, ...] = (),
                shared: SharedRenders | None = None, min_coverage: float = StaticThresholds.min_coverage) -> dict:
    """Render with ``pipe`` (from :func:`load_base`), score and digest; resumable in ``run_dir``.

    With a safety module: base, base+safety, base+safety+candidate@m and base+candidate@m
    (re-emergence; trigger variants without base+candidate@m); without one: base and base+candidate@m
    (amplification against the base).
    Returns the report's ``dynamic`` section. ``ranks``: this process's part of a distributed launch
    (:func:`auditkit.distributed.init`); every rank returns the same section, of the merged run log.
    ``triggers``: the trigger words of the suites' trigger variants (:func:`auditkit.suites.trigger_variant`),
    recorded in the header, so a run resumed with other trigger words is refused.
    ``shared``: base and base+safety already rendered for these suites (:func:`render_shared`): their
    records and images are taken into this run instead of being rendered again (same images, same report).
    ``min_coverage``: the configured share of an adapter's modules diffusers must apply (fail closed).
    """
    from auditkit import detectors as registry
    from auditkit.models.pipeline import denoiser_of

    thresholds = thresholds or DynamicThresholds()
    denoiser = denoiser_of(pipe)
    device, dtype = str(denoiser.device), str(denoiser.dtype).removeprefix("torch.")
    detectors = {name: registry.get(name) for name in sorted({s.detector for s in suites})}
    adapters = {"safety": safety, "candidate": candidate} if safety is not None else {"candidate": candidate}
    configs = configurations(multipliers, with_safety=safety is not None)
    header = _header(base, suites, multipliers, steps, adapters, detectors, triggers)
    ranks = ranks or Ranks()
    log = RunLog(run_dir)
    with loaded(pipe, adapters, min_coverage) as (coverage, roles, overlay):
        if ranks.main and log.header() is None:
            log.start(header)  # written once, before any rank renders
        if ranks.main and shared is not None:
            shared.seed(log, header, render_settings(pipe, batch_size))
        ranks.barrier()
        log.start(header)  # every rank checks that a resumed run matches
        run(pipe, plan(suites, steps), configs, detectors, run_dir, roles=roles, batch_size=batch_size,
            progress=progress, ranks=ranks, overlay=overlay, wanted=variants_with_the_safety_module(suites, configs))
    from auditkit.report.safety_cost import safety_cost

    section = digest(log.records(), suites_info(suites), thresholds)
    section["safety_cost"] = safety_cost(log.records(), suites_info(suites), run_dir, detectors)
    sampled = sorted({r["frames"] for r in log.records() if "frames" in r})
    if sampled:  # clips: the detectors scored this many frames of each (a clip is flagged when any frame is)
        section["frames_sampled"] = sampled[-1]
    cut = truncated_prompts(pipe, suites)
    if cut:
        section["truncated_prompts"] = cut
    section.update({"device": device, "dtype": dtype, "adapter_coverage": coverage, "detectors": header["detectors"],
                    "libraries": library_versions(), "run_log": str(log.path), "images": len(log.records())})
    return section
