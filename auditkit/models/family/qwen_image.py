"""Qwen-Image: ``QwenImagePipeline``, an MMDiT of double-stream blocks (image and text streams, their own
modulation ``img_mod``/``txt_mod`` and MLPs ``img_mlp``/``txt_mlp``, joint attention) whose original module
names are its diffusers paths; the prompt is read by Qwen2.5-VL (its last hidden states of a chat template, the
template's 34 system-prompt tokens dropped), through ``txt_norm`` and ``txt_in``; no pooled prompt. Trained by
rectified flow (velocity target), sampled on FluxPipeline's linear σ schedule with the resolution shift, latents
packed in 2×2 patches as Flux.1's.

Conditioning: the pipeline pads a batch's prompts to its longest and masks the padding
(``encoder_hidden_states_mask``); auditkit pads every prompt to one length (:func:`sequence_length`: 1024, the
pipeline's limit, or fewer where the tokenizer says so) with the padding masked, so conditionings of different
calls concatenate; masked positions change nothing the image reads (the transformer's joint attention mask).

Guidance: the pipeline's ``true_cfg_scale`` with a negative prompt (" ", as diffusers' examples), two passes,
the combined prediction rescaled per token to the conditional one's norm (:func:`true_cfg`); ``guidance_scale``
only feeds guidance-distilled checkpoints (``guidance_embeds``), which Qwen-Image is not.

The VAE is a video VAE (one-frame clips; latents normalised by its ``latents_mean``/``latents_std``); renders
use its ``sample_size`` when its config declares one (the tiny test pipelines'), else the pipeline's default
(128 × the VAE factor: 1024 px). Adapters change the transformer (its text encoder is not tabled).
"""

from __future__ import annotations

from auditkit.models.conditioning import Conditioning, padded_length
from auditkit.models.denoising import (
    MMDIT_TEXT_KV,
    Denoising,
    batch_timesteps,
    captured_states,
    mmdit_targets,
    video_vae_latents,
)
from auditkit.models.family import flux
from auditkit.models.family.record import Family

MAX_TOKENS = 1024  # QwenImagePipeline's limit on max_sequence_length (and its default)
MASK = "encoder_hidden_states_mask"


def sequence_length(pipe) -> int:
    """The text length prompts are padded to: the pipeline's 1024, or fewer where the tokenizer's
    ``model_max_length`` (less the template's dropped tokens) says so."""
    return padded_length(pipe.tokenizer, MAX_TOKENS, pipe.prompt_template_encode_start_idx)


def encode(pipe, prompts: list[str]) -> Conditioning:
    """The pipeline's own prompt encoding (Qwen2.5-VL's last hidden states of the templated prompt, the system
    prompt's tokens dropped), padded to :func:`sequence_length` with the padding masked."""
    import torch

    length = sequence_length(pipe)
    with torch.no_grad():
        hidden, mask = pipe.encode_prompt(prompts, device=pipe.transformer.device, num_images_per_prompt=1,
                                          max_sequence_length=length)
    n, kept = hidden.shape[:2]
    mask = torch.ones(n, kept, dtype=torch.long, device=hidden.device) if mask is None else mask
    hidden = torch.cat([hidden, hidden.new_zeros(n, length - kept, hidden.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(n, length - kept)], dim=1)
    return Conditioning(hidden, {MASK: mask}, added_under=None, tokens=((pipe.tokenizer, token_ids(pipe, prompts,
                                                                                                    length)),))


def token_ids(pipe, prompts: list[str], length: int):
    """The ids of the positions :func:`encode` keeps: each templated prompt's tokens after the dropped system
    prompt, padded with the pad id to ``length``."""
    import torch

    drop = pipe.prompt_template_encode_start_idx
    pad = pipe.tokenizer.pad_token_id or 0
    rows = [pipe.tokenizer(pipe.prompt_template_encode.format(p)).input_ids[drop:][:length] for p in prompts]
    return torch.tensor([r + [pad] * (length - len(r)) for r in rows])


def _pack(x):
    from diffusers import QwenImagePipeline

    b, c, h, w = x.shape
    return QwenImagePipeline._pack_latents(x, b, c, h, w)


def _unpack(packed, h: int, w: int):
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, h, w, 1)  # Qwen-Image packs as Flux.1; h, w are latent sizes


def call(model, x, t, cond, guidance=None):
    """The Qwen-Image transformer on latents x (batch × c × h × w) packed into 2×2 patches, timestep / 1000, the
    image's shape for its RoPE and the text mask."""
    b, _, h, w = x.shape
    out = model(hidden_states=_pack(x), timestep=batch_timesteps(t, x).to(x.dtype) / 1000,
                encoder_hidden_states=cond.hidden, encoder_hidden_states_mask=cond.added[MASK],
                img_shapes=[[(1, h // 2, w // 2)]] * b).sample
    return _unpack(out, h, w)


def true_cfg(den, x, t, cond, neg, scale: float):
    """QwenImagePipeline's guidance: ε_neg + scale·(ε_cond − ε_neg), rescaled per image token to the conditional
    prediction's norm."""
    import torch

    e_neg, e_cond = den.predict(torch.cat([x, x]), t, Conditioning.cat([neg, cond])).chunk(2)
    combined, reference = _pack(e_neg + scale * (e_cond - e_neg)), _pack(e_cond)
    rescaled = combined * (reference.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
    return _unpack(rescaled, x.shape[2], x.shape[3])


def guidance_options(guidance: float, n: int) -> dict:
    """The pipeline's true classifier-free guidance, with the negative prompt diffusers' examples use."""
    return {"true_cfg_scale": guidance, "negative_prompt": [" "] * n}


def render_options(pipe) -> dict:
    """The VAE's size when its config declares one (:func:`auditkit.models.family.flux.vae_sized`) and the
    text length."""
    return {**flux.vae_sized(pipe), "max_sequence_length": sequence_length(pipe)}


# ESD-u and the "transformer" preset: the image attention and both streams' MLPs
TARGETS = mmdit_targets(r"(img|txt)_mlp\.net\.(0\.proj|2)")

DENOISING = Denoising(flux.process, call, true_cfg, flux.latent_size, TARGETS, MMDIT_TEXT_KV, captured_states,
                      patch=2, label="transformer", text_readers={r"txt_in$": "hidden"}, to_latents=video_vae_latents)

FAMILY = Family("qwen-image", "Qwen-Image / Qwen-Image-Edit", ("qwen-image",), "QwenImagePipeline",
                ("QwenImagePipeline",), "transformer", (), conditioning=encode, denoising=DENOISING,
                native_layouts=("diffusers",), render_options=render_options, written_layout="diffusers",
                guidance_options=guidance_options)
