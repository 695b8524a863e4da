"""Flux.1 (dev/schnell): ``FluxPipeline``, an MMDiT transformer (double- and single-stream blocks) trained by
rectified flow (velocity target; the training timestep drawn uniformly, as diffusers'
``train_dreambooth_lora_flux.py`` draws it; Euler sampling on FluxPipeline's linear σ schedule, shifted by the
image's token count), a CLIP text encoder whose pooled output conditions the modulation and T5, whose hidden
states are the text tokens.

The transformer takes its latents packed into 2×2 patches (``FluxPipeline._pack_latents``), their position
ids (``_prepare_latent_image_ids``) and zero text ids, the timestep / 1000 and, for guidance-distilled
checkpoints (``guidance_embeds``: Flux.1-dev), the guidance as an input (embedded guidance: one pass, not
classifier-free). The shipped DiT lab model is of this family.

Renders: ``FluxPipeline`` renders at ``default_sample_size`` (a constant 128) × the VAE factor unless told a
size: 1024 px for Flux.1, and the same for a tiny test pipeline. The VAE's own ``sample_size`` (1024 in
Flux.1's ``vae/config.json``) is the size the model was built for, so renders use it: the real model renders
as the pipeline would by default, a small one at its own small size. Likewise the T5 length
(``max_sequence_length``, 512 unless told): the tokenizer's ``model_max_length`` when shorter.

diffusers' Flux loader bakes kohya alphas into the factors, names kohya's txt_in/final_layer modules without
the transformer prefix (and so drops them), splits single blocks at Flux.1's real widths only, and reads peft
files as fal Kontext ones: only diffusers-layout files go to it as they are (tests/lora/test_flux_files.py).
It loads no T5 (text_encoder_2) LoRA.
"""

from __future__ import annotations

from auditkit.models.conditioning import Conditioning, padded_length, token_ids
from auditkit.models.denoising import (
    MMDIT_TARGETS,
    MMDIT_TEXT_KV,
    MMDIT_TEXT_READERS,
    Denoising,
    FlowMatchingProcess,
    batch_timesteps,
    captured_states,
    embedded_guidance,
    linear_sigma_schedule,
    uniform_density,
)
from auditkit.models.family.record import Family

T5_TOKENS = 512  # FluxPipeline's default max_sequence_length


def sequence_length(tokenizer) -> int:
    """The T5 length Flux prompts are padded to: FluxPipeline's default (512), or the T5 tokenizer's
    ``model_max_length`` when it declares fewer (the DiT lab: 16, the length it was trained at; Flux runs no
    attention mask over T5's padding, so the length is part of the conditioning)."""
    return padded_length(tokenizer, T5_TOKENS)


def encode(pipe, prompts: list[str]) -> Conditioning:
    """The pipeline's own prompt encoding: T5's hidden states (the text tokens) and CLIP's pooled output (the
    modulation), at the T5 length renders use (:func:`sequence_length`)."""
    import torch

    with torch.no_grad():
        hidden, pooled, _ = pipe.encode_prompt(prompts, None, device=pipe.transformer.device, num_images_per_prompt=1,
                                               max_sequence_length=sequence_length(pipe.tokenizer_2))
    ids = token_ids(pipe.tokenizer_2, prompts, hidden.shape[1])
    return Conditioning(hidden, {"pooled_projections": pooled}, added_under=None, tokens=((pipe.tokenizer_2, ids),))


def call(model, x, t, cond, guidance=None):
    """Flux.1 on latents x (batch × c × h × w): packed into 2×2 patches, with position ids, timestep / 1000
    and (guidance-distilled checkpoints) the guidance as an input; the prediction is unpacked again."""
    import torch
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    txt_ids = torch.zeros(cond.hidden.shape[1], 3, device=x.device, dtype=x.dtype)
    g = torch.full((b,), float(guidance), device=x.device) if model.config.guidance_embeds else None
    out = model(hidden_states=packed, timestep=batch_timesteps(t, x).to(x.dtype) / 1000, guidance=g, img_ids=img_ids,
                txt_ids=txt_ids, **cond.kwargs()).sample
    return FluxPipeline._unpack_latents(out, h, w, 1)  # h, w are latent sizes: a VAE factor of 1


def vae_sized(pipe) -> dict:
    """Height and width from the VAE's ``sample_size``; nothing when the VAE does not say."""
    size = getattr(getattr(pipe, "vae", None), "config", None)
    size = getattr(size, "sample_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return {"height": int(size), "width": int(size)} if isinstance(size, int) and size > 0 else {}


def render_options(pipe) -> dict:
    """The VAE's size (:func:`vae_sized`) and the T5 length prompts are padded to (:func:`sequence_length`:
    512, or fewer where the tokenizer says so)."""
    return {**vae_sized(pipe), "max_sequence_length": sequence_length(pipe.tokenizer_2)}


def latent_size(pipe, model) -> tuple[int, int]:
    """The transformer reads 2×2 patches of the VAE's channels; the image is the VAE's ``sample_size`` (what
    auditkit renders Flux at, :func:`render_options`)."""
    pixels = vae_sized(pipe).get("height") or 128 * pipe.vae_scale_factor  # FluxPipeline's default otherwise
    return model.config.in_channels // 4, pixels // pipe.vae_scale_factor


def process(scheduler_config) -> FlowMatchingProcess:
    """Rectified flow, uniform training timesteps, FluxPipeline's linear σ schedule."""
    return FlowMatchingProcess(scheduler_config, uniform_density, linear_sigma_schedule)


# diffusers' Flux DreamBooth script trains guidance-distilled checkpoints at guidance 3.5 (its default, and
# FluxPipeline's)
DENOISING = Denoising(process, call, embedded_guidance, latent_size, MMDIT_TARGETS, MMDIT_TEXT_KV, captured_states,
                      patch=2, guidance=3.5, label="transformer", text_readers=MMDIT_TEXT_READERS)

FAMILY = Family("flux", "Flux.1 (dev/schnell)", ("flux",), "FluxPipeline", ("FluxPipeline",), "transformer",
                ("text_encoder", "text_encoder_2"), conditioning=encode, denoising=DENOISING,
                kohya_prefixes={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"},
                native_layouts=("diffusers",), render_options=render_options, written_layout="diffusers")
