"""The repair methods: one record each (name, what it did, whether it needs data, how it runs).

Adding a method is one record here (and its algorithm in its own module); the CLI's ``--method``
choices, its help and the report's description are built from this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from auditkit.errors import BadInput


@dataclass(frozen=True)
class Outcome:
    modules: dict  # the repaired adapter's canonical modules
    details: dict  # what the method did, for the report's repair section
    notes: list[str]


@dataclass(frozen=True)
class RepairMethod:
    name: str
    summary: str  # one line for --help
    description: str  # what was done, for the report
    needs_data: bool  # retrains on the candidate's domain (--data and --base needed)
    run: Callable[..., Outcome]  # run(request, pipe, candidate, safety, bars, anchors) -> Outcome
    anchored: bool = False  # trains on anchor prompts (auditkit.repair.anchors): verified on disjoint ones
    cost: int = 0  # order of cost (auto tries the cheaper first): 0 data-free, then training passes per step


def _training_setup(req, pipe, candidate):
    """The denoiser, the candidate's training shape, its data and the checkpoint path of a trained repair."""
    from auditkit.models.pipeline import denoiser_for
    from auditkit.repair.retrain import settings_from
    from auditkit.train.data import load_folder

    den = denoiser_for(pipe)
    try:
        settings = settings_from(candidate, req.train, component=den.component, label=den.label)
    except ValueError as exc:
        raise BadInput(req.candidate, str(exc)) from None
    prefix = f"{den.component}."
    known = {n for n, _ in den.model.named_modules()}
    misfit = [n for n in candidate.modules if n.startswith(prefix) and n.split(".", 1)[1] not in known]
    if misfit:
        raise BadInput(req.candidate, f"{len(misfit)} of its modules are not in the base model's {den.label} (e.g. "
                                      f"{misfit[0]}): the adapter is for another architecture than --base")
    data, notes = domain_data(req, load_folder(req.data, den.image_size()))
    return den, settings, data, req.out / "checkpoints" / "finetune.ckpt.safetensors", notes


def domain_data(req, data):
    """The candidate's data without the items whose caption names the concept (the concept suites' word and terms,
    as metadata evidence finds them in tags): retrained or distilled on, they would teach the repaired adapter the
    concept again. BadInput naming the folder when nothing is left; a note saying how many were left out."""
    from auditkit.analysis.metadata import concept_pattern
    from auditkit.scan import metadata_concepts

    words = sorted({t for terms in metadata_concepts(req.suites).values() for t in terms})
    pattern = concept_pattern(tuple(words))
    if pattern is None:
        return data, []
    kept, dropped = data.without(lambda caption: pattern.search(caption.lower()) is not None)
    if not dropped:
        return data, []
    if not kept.captions:
        raise BadInput(req.data, f"every caption names the concept ({', '.join(words)}): a repair needs the "
                                 f"candidate's other data")
    return kept, [f"{len(dropped)} of the {len(data.captions)} data images have captions naming the concept "
                  f"({', '.join(words)}; e.g. {dropped[0].name}) and were left out of the repair's training"]


def _retrain(req, pipe, candidate, safety, bars, anchors, anchored: bool) -> Outcome:
    from auditkit.repair.retrain import retrain
    from auditkit.train.checkpoint import saved_step

    den, settings, data, ckpt, left_out = _training_setup(req, pipe, candidate)
    resumed = saved_step(ckpt)
    anchor = anchors.prompts if anchored else None
    method = "anchored" if anchored else "modular"
    ctx, update = bars(f"retrain {method} ({settings.steps} steps)")
    notes = [*settings.notes, *left_out]
    if anchored and safety.update is not None and safety.update.deltas().components() - {"unet"}:
        notes.append("the erased model's changes outside the UNet are not applied while retraining (UNet only); "
                     "the re-scans render the whole erased model")
    with ctx:  # a full-model safety module takes part exactly (its per-tensor differences), never truncated
        result = retrain(pipe, data.images, data.captions, settings, checkpoint=ckpt, progress=update,
                         safety=safety.exact(), anchor_prompts=anchor)
    info = settings.to_dict()
    if anchor:
        info["anchor_prompts"] = len(anchor)
    info.update(images=len(data.captions), final_loss=result.losses[-1] if result.losses else None,
                resumed_from_step=resumed, checkpoint=str(ckpt))
    return Outcome(result.modules, {"training": info}, notes)


def _correct(req, pipe, candidate, safety, bars, anchors) -> Outcome:
    from auditkit.repair.correction import correction_settings, train_correction
    from auditkit.train.checkpoint import saved_step

    dora = [n for n, m in candidate.modules.items() if m.needs_base]
    if dora:  # before the data is read
        raise BadInput(req.candidate, f"{len(dora)} DoRA modules (e.g. {dora[0]}) need the base weights to be kept "
                                      f"exactly; use --method anchored or modular")
    den, settings, data, ckpt, left_out = _training_setup(req, pipe, candidate)
    settings, longer = correction_settings(settings)
    resumed = saved_step(ckpt)
    ctx, update = bars(f"retrain corrected ({settings.steps} steps)")
    with ctx:
        result = train_correction(pipe, data.images, data.captions, candidate.modules, safety.exact(), anchors.prompts,
                                  settings, progress=update, checkpoint=ckpt, guidance=anchors.guidance)
    info = settings.to_dict()
    info.update(anchor_prompts=len(anchors.prompts), images=len(data.captions),
                final_loss=result.losses[-1] if result.losses else None, resumed_from_step=resumed,
                checkpoint=str(ckpt), correction_modules=len(result.correction),
                kept_candidate_modules=len(candidate.modules))
    notes = [f"the candidate's {len(candidate.modules)} modules were kept and a rank-{settings.rank} correction added "
             f"to {len(result.correction)} of them (the repaired adapter's rank is the sum)", *longer, *left_out]
    return Outcome(result.modules, {"training": info}, notes)


def _projection(req, pipe, candidate, safety, bars, anchors, safelora: bool) -> Outcome:
    from auditkit.repair.algebra import project, safelora_module, sign_aware_module

    module_fn = partial(safelora_module, threshold=req.threshold) if safelora else sign_aware_module
    modules, reports = project(candidate.modules, safety.modules, module_fn)
    changed = [r for r in reports if r.changed]
    details = {"projection": {"modules_shared": len(reports), "modules_changed": len(changed),
                              "threshold": req.threshold if safelora else None,
                              "modules": [r.to_dict() for r in reports]}}
    notes = [] if changed else ["the projection changed no module: the repaired adapter equals the candidate"]
    if safety.update is not None:
        kept = safety.update.summary()["min_energy_kept"]
        notes.append(f"projected against the erased model's update as a truncated SVD per module (energy "
                     f"{safety.update.energy}; at least {kept:.2%} kept)" if kept is not None else
                     "the erased model changes no linear/conv module: nothing to project against")
    return Outcome(modules, details, notes)


METHODS: dict[str, RepairMethod] = {m.name: m for m in (
    RepairMethod(
        "modular", "retrain on --data separately from the safety module (Modular LoRA)",
        "Modular LoRA (Kim et al. 2024): the fine-tuning adapter was retrained on the base model alone, the "
        "safety module frozen and outside the trained update, and is added to the safety module at inference.",
        True, partial(_retrain, anchored=False), cost=1),
    RepairMethod(
        "corrected", "keep the candidate and train a correction on --data that takes the concept back out "
                     "(keeps the most of the candidate's domain)",
        "Corrected (auditkit): the candidate was kept and a correction LoRA added, trained on top of the safety "
        "module and the candidate with the model's predictions pinned to the safe model's on the anchor prompts "
        "and to the candidate's own on its data captions, so the repaired adapter differs from the candidate "
        "only where the concept is asked for.",
        True, _correct, anchored=True, cost=2),
    RepairMethod(
        "anchored", "retrain on --data on top of the safety module, pinned to it on the concept prompts (keeps "
                    "more of the domain where the safety module damaged it)",
        "Anchored retraining (auditkit): the fine-tuning adapter was retrained on top of the merged safety "
        "module with its predictions on the anchor prompts (the concept's) pinned to the safe model's, so it could "
        "repair what the safety module damaged in the candidate's domain but not learn the concept back.",
        True, partial(_retrain, anchored=True), anchored=True, cost=2),
    RepairMethod(
        "sign-aware", "data-free removal of the part that cancels the safety update",
        "Data-free sign-aware projection: in every module shared with the safety adapter, the part of the "
        "candidate's update inside the safety update's subspace that does not reinforce it was removed.",
        False, partial(_projection, safelora=False)),
    RepairMethod(
        "safelora", "data-free Safe LoRA projection",
        "Data-free Safe LoRA projection (Hsu et al. 2024): modules whose update lies mostly outside the safety "
        "update's column space were replaced by their projection onto it.",
        False, partial(_projection, safelora=True)),
)}


def default_method(has_data: bool) -> str:
    return "modular" if has_data else "sign-aware"
