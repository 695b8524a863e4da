"""Fine-tuning on an image-caption set: LoRA (on top of a safety module, or modular) or full.

Modes (Kim et al., "Safety Alignment Backfires", arXiv 2412.00357):

* ``on-top``  the safety update is merged into the weights, then a LoRA is trained: common
              practice, and the paper's failing baseline (the LoRA is free to learn −ΔW_safe);
* ``modular`` the LoRA is trained on the base alone and only added to the safety module at
              inference, W* = W0 + ΔW_safe + ΔW_ft ("Modular LoRA");
* ``full``    full fine-tuning of the target layers' weights on top of the safety module (the
              paper's strongest jailbreak). Its update is returned densely and as a truncated-SVD LoRA.

The objective is the family's own denoising loss on VAE latents (:mod:`auditkit.models.denoising`):
ε-prediction with DDPM noise for SD 1/2 and SDXL, the flow-matching velocity loss
‖v_θ(x_t) − (ε − x0)‖² with x_t = (1−σ)·x0 + σ·ε for SD3 and Flux.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput
from auditkit.lora.adapter import LoraModule
from auditkit.lora.write import check_trained
from auditkit.models.attach import composed
from auditkit.models.pipeline import denoiser_for
from auditkit.models.pipeline import encode as encode_conditioning
from auditkit.setting import setting
from auditkit.train.loop import StepProgress, optimise
from auditkit.train.lora import (
    add_lora,
    check_finite_parameters,
    check_int,
    check_lora_settings,
    check_number,
    check_targets,
    denoiser_targets,
    extract_lora,
    lora_from_delta,
    lora_parameters,
    optimizer_for,
    remove_lora,
)

MODES = ("on-top", "modular", "full")


@dataclass(frozen=True)
class FinetuneConfig:
    mode: str = setting("on-top", "on-top: safety merged, then fine-tune (common practice); modular: fine-tune on the "
                        "base, add the safety module at inference (Modular LoRA); full: full fine-tuning on top.",
                        choices=MODES)
    targets: str = setting("transformer", "Trained modules: transformer, attention, cross-kv, esd-x, esd-u, or a "
                           "regex.")  # a preset of auditkit.train.lora.TARGETS, or a regex
    rank: int = setting(8, "LoRA rank.")
    alpha: float | None = setting(None, "LoRA alpha (default: the rank, i.e. scale 1).")
    steps: int = setting(400, "Training steps.")
    lr: float = setting(1e-3, "Learning rate (AdamW).")
    batch: int = setting(32, "Images per step.")
    seed: int = setting(0, "Seed of the data order, noise and timesteps.")
    extract_rank: int = setting(32, "full mode: rank of the LoRA extracted from the dense update.")
    anchor_weight: float = setting(1.0, "on-top with anchor prompts: weight of the anchor term.")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise BadInput for a setting that would crash, train nothing or write NaN; needs no model."""
        if self.mode not in MODES:
            raise BadInput(None, f"mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        check_targets("targets", self.targets)
        check_lora_settings(self.rank, self.alpha, self.steps, self.lr, self.batch, self.seed)
        check_int("extract_rank", self.extract_rank, 1)
        check_number("anchor_weight", self.anchor_weight)
        if self.anchor_weight < 0:  # a negative weight would push the model away from the safe prediction
            raise BadInput(None, f"anchor_weight must be ≥ 0 (got {self.anchor_weight!r})")


@dataclass
class FinetuneResult:
    modules: dict[str, LoraModule]  # the fine-tuning update as a LoRA (extracted for full mode)
    dense: dict[str, np.ndarray] | None = None  # full mode: the exact per-module weight update
    losses: list[float] | None = None


def encode_images(pipe, images_u8: np.ndarray):
    """VAE latents (distribution means, shifted and scaled as the pipeline does) of uint8 images N×H×W×3."""
    return denoiser_for(pipe).latents(images_u8)


def finetune(pipe, images_u8: np.ndarray, captions: list[str], cfg: FinetuneConfig = FinetuneConfig(),
             safety: dict[str, LoraModule] | None = None, progress: StepProgress | None = None,
             checkpoint: str | Path | None = None, checkpoint_every: int = 50,
             anchor_prompts: list[str] | None = None) -> FinetuneResult:
    """Fine-tune the pipeline's denoiser on (images, captions); the pipeline is left unchanged afterwards.

    With ``checkpoint`` (LoRA modes), the state is saved every ``checkpoint_every`` steps and at the end,
    and a run that finds a checkpoint of the same settings and data continues from it.

    With ``anchor_prompts`` (on-top mode), each step also pins the model's prediction on those
    prompts (the erased concept's) to the safe model's own, ``cfg.anchor_weight``·‖ε_θ(x_t, c) −
    ε_safe(x_t, c)‖² (ε: the family's prediction, a velocity for flow-matching families): the LoRA may
    repair what the safety module damaged elsewhere but cannot learn back the concept (an anchored
    fine-tune; auditkit's addition, not from the paper).

    Raises BadInput when the targets select nothing (before any work), or when training diverges or
    leaves the update all zero: no such adapter is ever returned.
    """
    import torch

    from auditkit.train import checkpoint as ckpt

    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    if cfg.mode in ("on-top", "full") and not safety:
        raise ValueError(f"mode {cfg.mode!r} needs the safety adapter")
    if checkpoint is not None and cfg.mode == "full":
        raise ValueError("checkpoints are supported for LoRA modes only")
    if anchor_prompts and cfg.mode != "on-top":
        raise ValueError("anchor prompts need mode 'on-top' (the safe model is the anchor)")
    check_pairs(images_u8, captions)
    den = denoiser_for(pipe)
    model, component, process = den.model, den.component, den.process
    names = denoiser_targets(den, cfg.targets)  # a regex that selects nothing fails before any work
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    latents = den.latents(images_u8)
    unique = sorted(set(captions))
    caption_idx = torch.tensor([unique.index(c) for c in captions])
    text = encode_conditioning(pipe, unique)
    anchor = encode_conditioning(pipe, list(anchor_prompts)) if anchor_prompts else None
    merged = (safety, 1.0) if cfg.mode in ("on-top", "full") else ({}, 0.0)
    with composed(model, merged, component=component):
        original = {n: model.get_submodule(n).weight.detach().clone() for n in names} if cfg.mode == "full" else {}
        if cfg.mode == "full":  # weights only, so the dense update below is the whole change
            params = [model.get_submodule(n).weight for n in names]
        else:
            add_lora(model, names, cfg.rank, cfg.alpha, adapter_name="ft", seed=cfg.seed)
            params = lora_parameters(model, "ft")
        opt = optimizer_for(model, params, cfg.lr)
        try:  # from here on, any exception (a refused checkpoint included) removes the adapter again
            fp = ""
            if checkpoint is not None:
                fp = ckpt.fingerprint({"config": cfg.__dict__, "anchor": list(anchor_prompts or [])}, images_u8,
                                      captions, safety if cfg.mode == "on-top" else None)

            def step_loss(step):
                idx, x0, noise, xt, t = noisy_batch(latents, process, cfg.batch, rng, gen)
                pred = den.predict(xt, t, text[caption_idx[idx]])
                loss = torch.nn.functional.mse_loss(pred.float(), process.target(x0, noise).float())
                if anchor is not None:
                    loss = loss + cfg.anchor_weight * _anchor_loss(den, anchor, xt, t, rng)
                return loss

            model.train()
            losses = optimise(step_loss, params, opt, cfg.steps, rng, gen, progress, checkpoint, fp, checkpoint_every)
            model.eval()
            check_finite_parameters(params)  # before the SVD below, which fails on NaN
            if cfg.mode == "full":
                dense = {f"{component}.{n}": (model.get_submodule(n).weight.detach() - original[n]).double().cpu()
                         .numpy().reshape(original[n].shape[0], -1) for n in names}
                modules = {n: lora_from_delta(n, d, cfg.extract_rank) for n, d in dense.items()}
                check_trained(modules)
                return FinetuneResult(modules, dense, losses)
            modules = extract_lora(model, "ft", prefix=component)
            check_trained(modules)
            return FinetuneResult(modules, None, losses)
        finally:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            if cfg.mode == "full":
                with torch.no_grad():
                    for n in names:
                        model.get_submodule(n).weight.copy_(original[n])
            else:
                remove_lora(model, "ft")


def check_pairs(images_u8: np.ndarray, captions: list[str]) -> None:
    """Refuse (BadInput) training data without one caption per image, or without any image."""
    if len(images_u8) == 0 or len(images_u8) != len(captions):
        raise BadInput(None, f"need one caption per image and at least one image (got {len(images_u8)} images, "
                             f"{len(captions)} captions)")


def noisy_batch(latents, process, n: int, rng: np.random.Generator, gen):
    """``n`` training points: data indices (numpy stream), clean latents, noise and timesteps (torch stream),
    and the noised latents: (idx, x0, noise, x_t, t)."""
    import torch

    idx = torch.from_numpy(rng.integers(0, len(latents), n))
    x0 = latents[idx]
    noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
    t = process.sample_timesteps(n, gen)
    return idx, x0, noise, process.add_noise(x0, noise, t), t.to(x0.device)


def loss_to_disabled(den, x, t, cond):
    """‖ε_θ(x, t, c) − ε_off(x, t, c)‖²: the model's prediction against its own with the trained (peft) adapters
    switched off, which is the target (no gradient)."""
    import torch

    den.model.disable_adapters()
    try:
        with torch.no_grad():
            target = den.predict(x, t, cond)
    finally:
        den.model.enable_adapters()
    return torch.nn.functional.mse_loss(den.predict(x, t, cond).float(), target.float())


def _anchor_loss(den, anchor, xt, t, rng):
    """‖ε_θ(x_t, c) − ε_safe(x_t, c)‖² on anchor prompts c; ε_safe = the model with the trained LoRA disabled."""
    import torch

    idx = torch.from_numpy(np.asarray(rng.integers(0, len(anchor), len(xt))))
    return loss_to_disabled(den, xt, t, anchor[idx])
