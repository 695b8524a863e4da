"""ESD concept erasure trained as a Safety LoRA (Gandikota et al., "Erasing Concepts from
Diffusion Models", ICCV 2023; rohitgandikota/erasing), for every family auditkit loads.

Objective: with x_t drawn from the model's own trajectory for the concept prompt c,
    ε_θ(x_t, c, t)  →  ε*(x_t, ∅, t) − η · (ε*(x_t, c, t) − ε*(x_t, ∅, t))
where ε* is the frozen original model (here: the same denoiser with the LoRA disabled) and θ only the
LoRA. For flow-matching families (SD3, Flux) ε is the velocity prediction: negative guidance is the
same linear combination of the two predictions. The trajectory, the denoiser call and the guidance
used while sampling it are the family's (:mod:`auditkit.models.denoising`): DDIM with classifier-free
guidance for SD 1/2 and SDXL, Euler with classifier-free guidance for SD3, Euler with the embedded
guidance for Flux.1-dev.

**Preservation** (``preserve`` = λ > 0, with anchor prompts a, e.g. other shapes and colours): the
published erasures keep the rest of the model close to the original by pinning it there, so the loss gains
    λ · ‖ε_θ(x_t^a, a, t) − ε*(x_t^a, a, t)‖²
with x_t^a drawn from the anchors' own trajectories (sampled in the same pass as the concept's, stopped at the
same step). The unconditional prompt is always among the anchors when λ > 0: classifier-free guidance reads
ε_θ(x_t, ∅), and ESD-u's layers change it too.

ESD-x trains what reads the prompt (UNet cross-attention ``attn2``; MMDiT joint attention's text
projections), ESD-u the other transformer layers (``auditkit.models.denoising`` target tables).

As a LoRA (:func:`train_esd`), or as the original code does, by full fine-tuning of those layers' weights
(:func:`train_esd_full`): the erased model itself, returned as its exact per-module weight update. There
ε* is the model with its original weights, put back for the frozen predictions of each step (no copy of
the denoiser is held).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from auditkit.errors import BadInput
from auditkit.lora.adapter import LoraModule
from auditkit.lora.write import check_trained
from auditkit.models.conditioning import Conditioning
from auditkit.models.difference import TensorDeltas
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
    lora_parameters,
    optimizer_for,
    remove_lora,
)


@dataclass(frozen=True)
class ESDConfig:
    method: str = "esd-x"  # preset name in auditkit.train.lora.TARGETS, or a regex
    rank: int = setting(4, "LoRA rank.")
    alpha: float | None = setting(None, "LoRA alpha (default: the rank, i.e. scale 1).")
    steps: int = setting(300, "Training steps.")
    lr: float = setting(1e-3, "Learning rate (AdamW).")
    batch: int = setting(16, "Prompts per step.")
    eta: float = setting(1.0, "Negative-guidance strength of the ESD target.")
    # DDIM; Euler for the flow-matching families
    ddim_steps: int = setting(25, "ESD: steps of the sampled trajectories x_t is drawn from (fewer: faster training).")
    guidance: float = 3.0  # guidance of the trajectory sampling
    seed: int = setting(0, "Seed of the prompts' order, noise and timesteps.")
    preserve: float = 0.0  # λ of the preservation term (0: none; needs anchor prompts when > 0)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise BadInput for a setting that would crash, train nothing or write NaN; needs no model."""
        check_targets("method", self.method)
        check_lora_settings(self.rank, self.alpha, self.steps, self.lr, self.batch, self.seed)
        check_number("eta", self.eta)  # a negative eta is allowed: it strengthens the concept (a control)
        check_int("ddim_steps", self.ddim_steps, 1)
        check_number("guidance", self.guidance)
        check_number("preserve", self.preserve)
        if self.preserve < 0:
            raise BadInput(None, f"preserve must be >= 0 (got {self.preserve})")


def encode(pipe, prompts: Sequence[str]):
    """Text embeddings of ``prompts`` (no gradient; the text encoder stays frozen): the denoiser's
    ``encoder_hidden_states``. Families with added conditioning (SDXL, SD3, Flux) need
    :func:`auditkit.models.pipeline.encode`, which this returns the hidden states of."""
    return encode_conditioning(pipe, prompts).hidden


def train_esd(pipe, concept_prompts: Sequence[str], cfg: ESDConfig = ESDConfig(),
              progress: StepProgress | None = None, anchor_prompts: Sequence[str] = ()) -> dict[str, LoraModule]:
    """Train an ESD Safety LoRA on the pipeline's denoiser (its family's conditioning, call and sampler:
    :mod:`auditkit.models.conditioning`, :mod:`auditkit.models.denoising`); returns it as canonical modules.

    ``anchor_prompts`` with ``cfg.preserve`` > 0: the preservation term (module docstring). The denoiser is
    left as it was (the adapter is removed after extraction). Raises BadInput when training diverges or leaves
    the adapter all zero: no such adapter is ever returned.
    """
    anchors = check_anchor_prompts(concept_prompts, anchor_prompts, cfg)
    den = denoiser_for(pipe)
    model = den.model
    add_lora(model, denoiser_targets(den, cfg.method), cfg.rank, cfg.alpha, adapter_name="esd", seed=cfg.seed)
    try:
        params = lora_parameters(model, "esd")
        _optimise(pipe, den, concept_prompts, cfg, params, _adapters_disabled(model), progress, anchors)
        modules = extract_lora(model, "esd", prefix=den.component)
        check_trained(modules)
        return modules
    finally:
        model.eval()
        remove_lora(model, "esd")
        for p in model.parameters():
            p.requires_grad_(False)


def train_esd_full(pipe, concept_prompts: Sequence[str], cfg: ESDConfig = ESDConfig(),
                   progress: StepProgress | None = None, anchor_prompts: Sequence[str] = ()) -> TensorDeltas:
    """ESD by full fine-tuning of the ``cfg.method`` layers' weights (``rank``/``alpha`` unused): the erased
    model's exact update, canonical tensor name (``<component>.<module>.weight``) -> ΔW in the tensor's shape
    (:class:`~auditkit.models.difference.TensorDeltas`, float32). The denoiser is left as it was.

    Raises BadInput when training diverges or changes nothing."""
    import torch

    anchors = check_anchor_prompts(concept_prompts, anchor_prompts, cfg)
    den = denoiser_for(pipe)
    model = den.model
    names = denoiser_targets(den, cfg.method)
    weights = [model.get_submodule(n).weight for n in names]
    original = [w.detach().clone() for w in weights]
    try:
        _optimise(pipe, den, concept_prompts, cfg, weights, _weights_swapped(weights, original), progress,
                  anchors)
        check_finite_parameters(weights)
        deltas = TensorDeltas()
        for n, w, w0 in zip(names, weights, original, strict=True):
            d = (w.detach() - w0).float().cpu().numpy()
            if d.any():
                deltas[f"{den.component}.{n}.weight"] = d
        if not deltas:
            raise BadInput(None, "ESD full fine-tuning changed no weight (learning rate too small?)")
        return deltas
    finally:
        model.eval()
        with torch.no_grad():
            for w, w0 in zip(weights, original, strict=True):
                w.copy_(w0)
        for p in model.parameters():
            p.requires_grad_(False)


def check_anchor_prompts(concept_prompts: Sequence[str], anchor_prompts: Sequence[str], cfg: ESDConfig) -> list[str]:
    """The anchors the preservation term pins (the unconditional prompt added), or [] without preservation.
    Raises ValueError without concept prompts, BadInput when λ > 0 has no anchors, anchors come without λ, or
    an anchor is also a concept prompt (it would be pinned and erased at once)."""
    from auditkit.suites import normalised

    if not concept_prompts:
        raise ValueError("ESD needs at least one concept prompt")
    if cfg.preserve > 0 and not anchor_prompts:
        raise BadInput(None, "preserve > 0 needs anchor prompts (what the preservation term pins)")
    if anchor_prompts and cfg.preserve == 0:
        raise BadInput(None, "anchor prompts need preserve > 0 (the weight of the preservation term)")
    concept = {normalised(p) for p in concept_prompts}
    shared = [a for a in anchor_prompts if normalised(a) in concept]
    if shared:
        raise BadInput(None, f"{len(shared)} anchor prompt(s) are also concept prompts (e.g. {shared[0]!r})")
    return list(dict.fromkeys(["", *anchor_prompts])) if anchor_prompts else []


def _adapters_disabled(model):
    """The frozen model ε* of a LoRA run: the denoiser with its adapters switched off."""

    @contextlib.contextmanager
    def frozen():
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()

    return frozen


def _weights_swapped(weights: list, original: list):
    """The frozen model ε* of a full run: the trained weights swapped for the original ones, then back."""
    import torch

    @contextlib.contextmanager
    def frozen():
        trained = [w.detach().clone() for w in weights]
        with torch.no_grad():
            for w, w0 in zip(weights, original, strict=True):
                w.copy_(w0)
        try:
            yield
        finally:
            with torch.no_grad():
                for w, wt in zip(weights, trained, strict=True):
                    w.copy_(wt)

    return frozen


def _optimise(pipe, den, concept_prompts: Sequence[str], cfg: ESDConfig, params: list, frozen,
              progress: StepProgress | None, anchors: Sequence[str] = ()) -> None:
    """The ESD loop (see the module docstring) over ``params``; ``frozen()`` is a context in which the
    denoiser computes ε*, the original model's predictions. With ``anchors``, each step also samples a batch
    of anchor prompts in the same trajectory pass and adds the preservation term."""
    import torch

    model = den.model
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = optimizer_for(model, params, cfg.lr)
    sampler = den.sampler(cfg.ddim_steps)
    uncond = encode_conditioning(pipe, [""])
    prompt_embeds = encode_conditioning(pipe, list(concept_prompts))

    anchor_embeds = encode_conditioning(pipe, list(anchors)) if anchors else None

    def step_loss(step):
        idx = rng.integers(0, len(concept_prompts), cfg.batch)
        cond = prompt_embeds[idx]
        n = cfg.batch
        if anchor_embeds is not None:  # one trajectory pass for the concept's rows and the anchors' rows
            cond = Conditioning.cat([cond, anchor_embeds[rng.integers(0, len(anchors), cfg.batch)]])
            n = 2 * cfg.batch
        neg = uncond.repeat(n)
        stop = int(rng.integers(0, cfg.ddim_steps))
        x = den.noise(n, gen) * sampler.init_noise_sigma
        model.eval()
        with torch.no_grad():  # the model's own trajectory (as trained so far) down to step `stop`
            for k in range(stop):
                x = sampler.step(den.guided(x, sampler.timesteps[k], cond, neg, cfg.guidance), k, x)
            t = sampler.timesteps[stop]
            with frozen():  # ε* of the unconditional and of each row's own prompt
                e_both = den.predict(torch.cat([x, x]), t, Conditioning.cat([neg, cond]))
            e0, ec = e_both.chunk(2)
            target = e0 - cfg.eta * (ec - e0)
            if anchor_embeds is not None:  # the anchors' rows keep the frozen model's own prediction
                target = torch.cat([target[: cfg.batch], ec[cfg.batch:]])
        model.train()
        pred = den.predict(x, t, cond)
        loss = torch.nn.functional.mse_loss(pred[: cfg.batch].float(), target[: cfg.batch].float())
        if anchor_embeds is not None:
            loss = loss + cfg.preserve * torch.nn.functional.mse_loss(pred[cfg.batch:].float(),
                                                                      target[cfg.batch:].float())
        return loss

    optimise(step_loss, params, opt, cfg.steps, rng, gen, progress)
