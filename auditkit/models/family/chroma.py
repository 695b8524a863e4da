"""Chroma: a Flux.1-schnell derivative without the modulation inputs (``ChromaPipeline``, its own
``ChromaTransformer2DModel``): Flux.1's double- and single-stream blocks, the modulation computed from the
timestep alone by a small MLP (the "distilled guidance" approximator, no pooled prompt, no guidance input),
one T5 text encoder whose hidden states are the text tokens. Trained by rectified flow (velocity target), as
Flux.1; sampled with classifier-free guidance (a negative prompt, two passes) on FluxPipeline's linear σ
schedule (:mod:`auditkit.models.family.flux`).

Unlike Flux.1, the pipeline passes an attention mask: T5 reads the prompt masked, and the transformer
attends to the prompt's tokens and the first padding token only (``ChromaPipeline._get_t5_prompt_embeds``:
positions ≤ the prompt's length), then to every image token (``_prepare_attention_mask``). The conditioning
keeps the text part of that mask; :func:`call` extends it over the image tokens as the pipeline does.

Adapters: diffusers loads Chroma's with its Flux loader (``FluxLoraLoaderMixin``). The shipped table has
the transformer only (its T5 is not tabled), so auditkit adapts the transformer (``text_encoders`` empty).
"""

from __future__ import annotations

from auditkit.models.conditioning import Conditioning, token_ids
from auditkit.models.denoising import (
    MMDIT_TARGETS,
    MMDIT_TEXT_KV,
    Denoising,
    batch_timesteps,
    captured_states,
    classifier_free,
)
from auditkit.models.family import flux
from auditkit.models.family.record import Family


def encode(pipe, prompts: list[str]) -> Conditioning:
    """The pipeline's own prompt encoding: T5's hidden states of the masked prompt and the text tokens'
    attention mask (the prompt and its first padding token), at the T5 length renders use."""
    import torch

    with torch.no_grad():
        hidden, _, mask, *_ = pipe.encode_prompt(prompts, device=pipe.transformer.device, num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False,
                                                 max_sequence_length=flux.sequence_length(pipe.tokenizer))
    ids = token_ids(pipe.tokenizer, prompts, hidden.shape[1])
    return Conditioning(hidden, {"attention_mask": mask}, added_under=None, tokens=((pipe.tokenizer, ids),))


def call(model, x, t, cond, guidance=None):
    """Chroma on latents x: packed into 2×2 patches with Flux.1's position ids, timestep / 1000, the text mask
    extended over the image tokens (``ChromaPipeline._prepare_attention_mask``)."""
    import torch
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    txt_ids = torch.zeros(cond.hidden.shape[1], 3, device=x.device, dtype=x.dtype)
    text_mask = cond.added["attention_mask"]
    mask = torch.cat([text_mask, torch.ones(b, packed.shape[1], device=x.device, dtype=text_mask.dtype)], dim=1)
    out = model(hidden_states=packed, timestep=batch_timesteps(t, x).to(x.dtype) / 1000,
                encoder_hidden_states=cond.hidden, img_ids=img_ids, txt_ids=txt_ids, attention_mask=mask).sample
    return FluxPipeline._unpack_latents(out, h, w, 1)


def render_options(pipe) -> dict:
    """Flux.1's: the VAE's size and the T5 length (of Chroma's one tokenizer)."""
    return {**flux.vae_sized(pipe), "max_sequence_length": flux.sequence_length(pipe.tokenizer)}


# Chroma's prompt enters only through context_embedder (no pooled projection)
DENOISING = Denoising(flux.process, call, classifier_free, flux.latent_size, MMDIT_TARGETS, MMDIT_TEXT_KV,
                      captured_states, patch=2, label="transformer", text_readers={r"context_embedder$": "hidden"})

FAMILY = Family("chroma", "Chroma", ("chroma",), "ChromaPipeline", ("ChromaPipeline",), "transformer", (),
                conditioning=encode, denoising=DENOISING, native_layouts=("diffusers",),
                render_options=render_options, written_layout="diffusers")
