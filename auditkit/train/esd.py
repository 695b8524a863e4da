"""ESD concept erasure trained as a Safety LoRA (Gandikota et al., "Erasing Concepts from
Diffusion Models", ICCV 2023; rohitgandikota/erasing), for any SD-family pipeline.

Objective: with x_t drawn from the model's own trajectory for the concept prompt c,
    ε_θ(x_t, c, t)  →  ε*(x_t, ∅, t) − η · (ε*(x_t, c, t) − ε*(x_t, ∅, t))
where ε* is the frozen original model (here: the same UNet with the LoRA disabled) and θ only the
LoRA. ESD-x trains cross-attention (``attn2``), ESD-u the other transformer layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from auditkit.lora.adapter import LoraModule
from auditkit.lora.write import check_trained
from auditkit.models.conditioning import Conditioning
from auditkit.models.conditioning import encode as encode_conditioning
from auditkit.train.lora import (
    add_lora,
    check_int,
    check_lora_settings,
    check_loss,
    check_number,
    check_targets,
    extract_lora,
    lora_parameters,
    optimizer_for,
    remove_lora,
    target_modules,
)

Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class ESDConfig:
    method: str = "esd-x"  # preset name in auditkit.train.lora.TARGETS, or a regex
    rank: int = 4
    alpha: float | None = None  # default: rank (scale 1)
    steps: int = 300
    lr: float = 1e-3
    batch: int = 16
    eta: float = 1.0  # negative-guidance strength
    ddim_steps: int = 25  # trajectory used to draw x_t
    guidance: float = 3.0  # guidance of the trajectory sampling
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise BadInput for a setting that would crash, train nothing or write NaN; needs no model."""
        check_targets("method", self.method)
        check_lora_settings(self.rank, self.alpha, self.steps, self.lr, self.batch, self.seed)
        check_number("eta", self.eta)  # a negative eta is allowed: it strengthens the concept (a control)
        check_int("ddim_steps", self.ddim_steps, 1)
        check_number("guidance", self.guidance)


def encode(pipe, prompts: Sequence[str]):
    """Text embeddings of ``prompts`` (no gradient; the text encoder stays frozen): the denoiser's
    ``encoder_hidden_states``. Families with added conditioning (SDXL) need
    :func:`auditkit.models.conditioning.encode`, which this returns the hidden states of."""
    return encode_conditioning(pipe, prompts).hidden


def train_esd(pipe, concept_prompts: Sequence[str], cfg: ESDConfig = ESDConfig(),
              progress: Progress | None = None) -> dict[str, LoraModule]:
    """Train an ESD Safety LoRA on ``pipe.unet`` (SD 1/2 and SDXL: the family's conditioning, see
    :mod:`auditkit.models.conditioning`); returns it as canonical modules.

    The pipeline's UNet is left as it was (the adapter is removed after extraction). Raises BadInput
    when training diverges or leaves the adapter all zero: no such adapter is ever returned.
    """
    import torch
    from diffusers import DDIMScheduler

    if not concept_prompts:
        raise ValueError("ESD needs at least one concept prompt")
    unet = pipe.unet
    device = unet.device
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    add_lora(unet, target_modules(unet, cfg.method), cfg.rank, cfg.alpha, adapter_name="esd", seed=cfg.seed)
    params = lora_parameters(unet, "esd")
    opt = optimizer_for(unet, params, cfg.lr)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(cfg.ddim_steps)
    uncond = encode_conditioning(pipe, [""])
    prompt_embeds = encode_conditioning(pipe, list(concept_prompts))
    shape = (cfg.batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    try:
        for step in range(cfg.steps):
            idx = rng.integers(0, len(concept_prompts), cfg.batch)
            cond = prompt_embeds[idx]
            neg = uncond.repeat(cfg.batch)
            stop = int(rng.integers(0, cfg.ddim_steps))
            x = torch.randn(shape, generator=gen).to(device) * sched.init_noise_sigma
            unet.eval()
            with torch.no_grad():  # the model's own trajectory (with the current LoRA) down to step `stop`
                for t in sched.timesteps[:stop]:
                    eps = _guided(unet, x, t, cond, neg, cfg.guidance)
                    x = sched.step(eps, t, x).prev_sample
                t = sched.timesteps[stop]
                unet.disable_adapters()
                e_both = unet(torch.cat([x, x]), t, **Conditioning.cat([neg, cond]).kwargs()).sample
                unet.enable_adapters()
                e0, ec = e_both.chunk(2)
                target = e0 - cfg.eta * (ec - e0)
            unet.train()
            pred = unet(x, t, **cond.kwargs()).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            loss_value = float(loss.detach())
            check_loss(loss_value, step + 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress:
                progress(step + 1, cfg.steps, loss_value)
        modules = extract_lora(unet, "esd")
        check_trained(modules)
        return modules
    finally:
        unet.eval()
        remove_lora(unet, "esd")
        for p in unet.parameters():
            p.requires_grad_(False)


def _guided(unet, x, t, cond, neg, guidance: float):
    import torch

    e = unet(torch.cat([x, x]), t, **Conditioning.cat([neg, cond]).kwargs()).sample
    e_neg, e_cond = e.chunk(2)
    return e_neg + guidance * (e_cond - e_neg)
