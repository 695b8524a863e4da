"""Corrected repair: keep the candidate and add a correction that takes the concept back out.

The repaired adapter is ΔW_cand + ΔW_corr. The correction is a LoRA on the candidate's denoiser modules,
trained on top of W0 + ΔW_safe + ΔW_cand (both frozen, merged exactly; a text-encoder part of the
candidate or the safety module is merged into its encoder while prompts are encoded) with two terms:

* concept: on anchor prompts c, ‖ε_θ(x_t, c) − ε_safe(x_t, c)‖², the safe model's own predictions (the
  candidate left out), at points x_t of the *candidate's* own guided sampling trajectories for the anchor
  prompts (where the concept comes back), computed once before training for a bank of trajectories, stopping
  points and prompts (as ESD draws x_t from the model's own trajectory);
* domain: on the candidate's data captions y, ‖ε_θ(x_t, y) − ε_cand(x_t, y)‖², the candidate's own
  predictions (the correction switched off): wherever the concept is not asked for, the repaired adapter
  is pulled to the candidate, including where the candidate mended the safety module's collateral damage.

The correction starts at zero (a fresh LoRA has B = 0), so step 0 is the candidate exactly. Unlike
modular or anchored retraining, nothing of the candidate's skill has to be learned again from the data:
the data only provides the noisy latents on which the two models are compared. auditkit's addition (a
distillation with a concept anchor), not from the paper; like every repair it is proven by the re-scan,
on concept prompts disjoint from its anchors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from auditkit.lora.adapter import LoraModule
from auditkit.repair.algebra import concatenate
from auditkit.repair.retrain import RetrainSettings
from auditkit.train.loop import StepProgress

BANK_BATCHES = 32  # the anchor bank holds this many batches of (x_t, t, prompt, safe prediction)
BANK_STEPS = 10  # sampler steps of the candidate's anchor trajectories the bank's x_t are drawn from
MIN_STEPS = 400  # a correction trains at least this long unless told otherwise (lab: 150 steps kept a third of
# a short candidate's domain, 400 more than half; benchmarks/repair_lab.py)


def correction_settings(settings: RetrainSettings) -> tuple[RetrainSettings, list[str]]:
    """The correction's training shape: the candidate's, at least :data:`MIN_STEPS` steps unless the steps were
    set by option (a short candidate's own length is too short to take the concept out and keep its domain)."""
    if settings.sources.get("steps") == "option" or settings.steps >= MIN_STEPS:
        return settings, []
    longer = replace(settings, steps=MIN_STEPS, sources={**settings.sources, "steps": f"at least {MIN_STEPS} for a "
                                                                                    f"correction"})
    return longer, [f"the correction trained {MIN_STEPS} steps, longer than the candidate's {settings.steps}"]


@dataclass
class CorrectionResult:
    modules: dict[str, LoraModule]  # the repaired adapter: the candidate's modules plus the correction (exact sum)
    correction: dict[str, LoraModule]  # the correction alone
    losses: list[float]


def train_correction(pipe, images_u8: np.ndarray, captions: list[str], candidate: dict[str, LoraModule],
                     safety, anchor_prompts: list[str], cfg: RetrainSettings,
                     progress: StepProgress | None = None, checkpoint=None,
                     checkpoint_every: int = 50, anchor_weight: float = 1.0, guidance: float = 5.0
                     ) -> CorrectionResult:
    """Train the correction (see the module's doc) with the shape ``cfg`` gives (targets, rank, alpha, steps, lr,
    batch, seed: :func:`auditkit.repair.retrain.settings_from`); ``guidance``: of the anchor trajectories (the
    anchor suite's). The pipeline is left unchanged afterwards.
    ``safety``: the safety module's exact update (modules or a full model's TensorDeltas). Resumable from
    ``checkpoint``."""
    import torch

    from auditkit.lora.write import check_trained
    from auditkit.models.attach import composed, encoders_composed
    from auditkit.models.pipeline import denoiser_for
    from auditkit.models.pipeline import encode as encode_conditioning
    from auditkit.train import checkpoint as ckpt
    from auditkit.train.finetune import check_pairs, loss_to_disabled, noisy_batch
    from auditkit.train.loop import optimise
    from auditkit.train.lora import (
        add_lora,
        check_finite_parameters,
        denoiser_targets,
        extract_lora,
        lora_parameters,
        optimizer_for,
        remove_lora,
    )

    if not anchor_prompts:
        raise ValueError("the correction needs anchor prompts (the concept's)")
    dora = [n for n, m in candidate.items() if m.needs_base]
    if dora:  # before any work: the candidate could not be kept exactly (repair.algebra.concatenate)
        raise ValueError(f"{dora[0]} is a DoRA module: its exact update needs the base weights")
    check_pairs(images_u8, captions)
    den = denoiser_for(pipe)
    model, component, process = den.model, den.component, den.process
    names = denoiser_targets(den, cfg.targets)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    latents = den.latents(images_u8)
    unique = sorted(set(captions))
    caption_idx = torch.tensor([unique.index(c) for c in captions])
    with encoders_composed(pipe, (safety, 1.0), denoiser=component):
        safe_anchor = encode_conditioning(pipe, list(anchor_prompts))
    with encoders_composed(pipe, (safety, 1.0), (candidate, 1.0), denoiser=component):
        text = encode_conditioning(pipe, unique)
        anchor = encode_conditioning(pipe, list(anchor_prompts))
        empty = encode_conditioning(pipe, [""])

    sampler, points, neg = den.sampler(BANK_STEPS), [], empty.repeat(cfg.batch)
    with composed(model, (safety, 1.0), (candidate, 1.0), component=component), torch.no_grad():
        for _ in range(BANK_BATCHES):  # the candidate's own trajectories on the anchor prompts
            p = torch.from_numpy(np.asarray(rng.integers(0, len(anchor_prompts), cfg.batch)))
            stop = int(rng.integers(0, BANK_STEPS))
            x = den.noise(cfg.batch, gen) * sampler.init_noise_sigma
            for k in range(stop):
                x = sampler.step(den.guided(x, sampler.timesteps[k], anchor[p], neg, guidance), k, x)
            points.append((x, sampler.timesteps[stop], p))
    with composed(model, (safety, 1.0), component=component), torch.no_grad():  # and the safe model's predictions
        bank = [(x, t, p, den.predict(x, t, safe_anchor[p])) for x, t, p in points]
    with composed(model, (safety, 1.0), (candidate, 1.0), component=component):
        add_lora(model, names, cfg.rank, cfg.alpha, adapter_name="corr", seed=cfg.seed)
        params = lora_parameters(model, "corr")
        opt = optimizer_for(model, params, cfg.lr)
        try:
            fp = ""
            if checkpoint is not None:
                frozen = {**{f"safety/{k}": v for k, v in safety.items()},
                          **{f"candidate/{k}": v for k, v in candidate.items()}}
                fp = ckpt.fingerprint({"method": "corrected", "config": cfg.to_dict(), "anchor_weight": anchor_weight,
                                       "anchor": list(anchor_prompts)},
                                      images_u8, captions, frozen)

            def step_loss(step):
                idx, _, _, xt, t = noisy_batch(latents, process, cfg.batch, rng, gen)
                loss = loss_to_disabled(den, xt, t, text[caption_idx[idx]])  # to the candidate's own prediction
                a_xt, a_t, a_p, a_target = bank[int(rng.integers(0, len(bank)))]
                pred = den.predict(a_xt, a_t, anchor[a_p])
                return loss + anchor_weight * torch.nn.functional.mse_loss(pred.float(), a_target.float())

            model.train()
            losses = optimise(step_loss, params, opt, cfg.steps, rng, gen, progress, checkpoint, fp, checkpoint_every)
            model.eval()
            check_finite_parameters(params)
            correction = extract_lora(model, "corr", prefix=component)
            check_trained(correction)
        finally:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            remove_lora(model, "corr")
    return CorrectionResult(concatenate((candidate, 1.0), (correction, 1.0)), correction, losses)
