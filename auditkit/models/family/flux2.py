"""Flux.2: dev and the Klein 4B / 9B distillations. Klein loads (``Flux2KleinPipeline``); Flux.2 dev
(``Flux2Pipeline``: a Mistral Small 3.1 text encoder with its own chat processor) is known to the static scan
only.

Flux.2 Klein: an MMDiT of double-stream blocks (text attention ``add_*_proj``/``to_add_out``, MLPs ``ff`` and
``ff_context``) and single-stream blocks (a fused ``to_qkv_mlp_proj``), shared modulation layers, no pooled prompt
and (Klein) no guidance input. The prompt is Qwen3's hidden states of a chat-templated prompt at layers 9, 18 and
27, side by side (3 × its width), padded to 512 tokens, no mask. The latents are the VAE's, 2×2-patchified into
4× the channels and normalised by the VAE's batch-norm statistics (``latent_factor`` 2: a latent pixel is 2×2 of
the VAE's), then flattened into tokens with 4-D position ids (T, H, W, L; text: L the token index). Trained by
rectified flow (velocity target), sampled on a linear σ schedule shifted by ``compute_empirical_mu`` (image
tokens and step count), guided by classifier-free guidance above 1 (not for step-distilled checkpoints).
"""

from __future__ import annotations

from auditkit.models.conditioning import Conditioning, padded_length
from auditkit.models.denoising import (
    MMDIT_TEXT_KV,
    Denoising,
    FlowMatchingProcess,
    batch_timesteps,
    captured_states,
    classifier_free,
    mmdit_targets,
    uniform_density,
)
from auditkit.models.family import flux
from auditkit.models.family.record import Family

MAX_TOKENS = 512  # Flux2KleinPipeline's default max_sequence_length


def sequence_length(pipe) -> int:
    """The length prompts are padded to: 512, or the tokenizer's ``model_max_length`` when shorter."""
    return padded_length(pipe.tokenizer, MAX_TOKENS)


def encode(pipe, prompts: list[str]) -> Conditioning:
    """The pipeline's own prompt encoding (Qwen3's hidden states at layers 9, 18, 27 side by side) and the ids of
    the templated prompt's tokens."""
    import torch

    length = sequence_length(pipe)
    with torch.no_grad():
        hidden, _ = pipe.encode_prompt(list(prompts), device=pipe.transformer.device, max_sequence_length=length)
    texts = [pipe.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                add_generation_prompt=True, enable_thinking=False) for p in prompts]
    ids = pipe.tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids
    return Conditioning(hidden, added_under=None, tokens=((pipe.tokenizer, ids),))


def call(model, x, t, cond, guidance=None):
    """Flux.2 on latents x (batch × c × h × w, patchified and normalised): flattened into tokens with their
    position ids and the text's, timestep / 1000."""
    from diffusers import Flux2KleinPipeline

    b, c, h, w = x.shape
    tokens = x.reshape(b, c, h * w).permute(0, 2, 1)
    g = None
    if model.config.guidance_embeds:
        import torch

        g = torch.full((b,), float(guidance), device=x.device, dtype=x.dtype)
    txt_ids = Flux2KleinPipeline._prepare_text_ids(cond.hidden).to(x.device)
    out = model(hidden_states=tokens, timestep=batch_timesteps(t, x).to(x.dtype) / 1000, guidance=g,
                encoder_hidden_states=cond.hidden, txt_ids=txt_ids,
                img_ids=Flux2KleinPipeline._prepare_latent_ids(x).to(x.device)).sample
    return out.permute(0, 2, 1).reshape(b, c, h, w)


def empirical_mu_schedule(sched, steps: int, image_tokens: int) -> None:
    """Flux2KleinPipeline's schedule: σ = linspace(1, 1/steps, steps) (the scheduler's own flow sigmas when it
    says so), shifted by ``compute_empirical_mu`` of the image tokens and the step count."""
    import numpy as np
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    mu = compute_empirical_mu(image_seq_len=image_tokens, num_steps=steps)
    if sched.config.get("use_flow_sigmas"):
        sched.set_timesteps(steps, mu=mu)
    else:
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)


def process(scheduler_config) -> FlowMatchingProcess:
    """Rectified flow, uniform training timesteps, the empirical-μ schedule."""
    return FlowMatchingProcess(scheduler_config, uniform_density, empirical_mu_schedule)


def to_latents(vae, x):
    """The VAE's distribution modes, 2×2-patchified and normalised by its batch-norm running statistics
    (``Flux2KleinPipeline._encode_vae_image``)."""
    import torch
    from diffusers import Flux2KleinPipeline

    z = Flux2KleinPipeline._patchify_latents(vae.encode(x).latent_dist.mode().float())
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
    return (z - mean) / std


def latent_size(pipe, model) -> tuple[int, int]:
    """The transformer's channels (4 × the VAE's, patchified); the image is the VAE's ``sample_size``, or the
    pipeline's default (128 × the VAE factor)."""
    pixels = flux.vae_sized(pipe).get("height") or 128 * pipe.vae_scale_factor
    return model.config.in_channels, pixels // (2 * pipe.vae_scale_factor)


def render_options(pipe) -> dict:
    """The VAE's size and the prompt length."""
    return {**flux.vae_sized(pipe), "max_sequence_length": sequence_length(pipe)}


# the double-stream blocks' MLPs and the single-stream blocks' fused projection and output
TARGETS = mmdit_targets(r"ff(_context)?\.linear_(in|out)|attn\.to_qkv_mlp_proj|attn\.to_out")

DENOISING = Denoising(process, call, classifier_free, latent_size, TARGETS, MMDIT_TEXT_KV, captured_states, patch=1,
                      label="transformer", text_readers={r"context_embedder$": "hidden"}, to_latents=to_latents,
                      latent_factor=2)

FAMILY = Family("flux2", "Flux.2 (dev, Klein 4B / 9B)", ("flux2-dev", "flux2-klein-4b", "flux2-klein-9b"),
                "Flux2KleinPipeline", ("Flux2KleinPipeline",), "transformer", (), conditioning=encode,
                denoising=DENOISING, native_layouts=("diffusers",), render_options=render_options,
                written_layout="diffusers")
