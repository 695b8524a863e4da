"""Stable Diffusion 3 / 3.5: ``StableDiffusion3Pipeline``, an MMDiT transformer trained by rectified flow
(velocity target; the training timestep drawn logit-normal, as diffusers' ``train_dreambooth_lora_sd3.py``
and the SD3 paper draw it; Euler sampling on the scheduler's own schedule), two CLIP text encoders and T5.

The conditioning is the pipeline's joint prompt embedding (CLIP-L and CLIP-G hidden states side by side,
zero-padded to T5's width, then T5's tokens after them along the sequence) and ``pooled_projections`` (both
CLIPs' pooled projections, concatenated). The transformer takes ``hidden_states`` and a batch of timesteps
on the 0–1000 scale.

diffusers' SD3 loader converts no kohya or original-named file and reads peft files as nothing: only
diffusers-layout files go to it as they are. It loads no T5 (text_encoder_3) LoRA. SD3 renders at the
transformer's sample_size × the VAE factor by itself.
"""

from __future__ import annotations

from auditkit.models.conditioning import Conditioning, token_ids
from auditkit.models.denoising import (
    MMDIT_TARGETS,
    MMDIT_TEXT_KV,
    MMDIT_TEXT_READERS,
    Denoising,
    FlowMatchingProcess,
    batch_timesteps,
    captured_states,
    classifier_free,
    configured_size,
    logit_normal_density,
    scheduler_schedule,
)
from auditkit.models.family.record import Family

T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length


def encode(pipe, prompts: list[str]) -> Conditioning:
    """The pipeline's own joint prompt embedding (CLIP-L + CLIP-G beside each other, then T5 along the
    sequence) and both CLIPs' pooled projections, at the pipeline's default T5 length."""
    import torch

    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=pipe.transformer.device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_TOKENS)
    clip_ids = token_ids(pipe.tokenizer, prompts, pipe.tokenizer_max_length)
    t5 = hidden.shape[1] - clip_ids.shape[1]  # CLIP's positions as tokenized (fewer for the sweep's short prompts)
    if pipe.text_encoder_3 is not None:
        t5_span = (pipe.tokenizer_3, token_ids(pipe.tokenizer_3, prompts, t5))
    else:  # the pipeline fills T5's positions with zeros
        t5_span = (None, torch.full((len(prompts), t5), -1))
    return Conditioning(hidden, {"pooled_projections": pooled}, added_under=None,
                        tokens=((pipe.tokenizer, clip_ids), t5_span))


def call(model, x, t, cond, guidance=None):
    """The SD3 transformer: a batch of timesteps on the 0–1000 scale (kept in float32, as the pipeline)."""
    return model(hidden_states=x, timestep=batch_timesteps(t, x), **cond.kwargs()).sample


def process(scheduler_config) -> FlowMatchingProcess:
    """Rectified flow, logit-normal training timesteps, the scheduler's own sampling schedule."""
    return FlowMatchingProcess(scheduler_config, logit_normal_density, scheduler_schedule)


DENOISING = Denoising(process, call, classifier_free, configured_size, MMDIT_TARGETS, MMDIT_TEXT_KV, captured_states,
                      patch=2, label="transformer", text_readers=MMDIT_TEXT_READERS)

FAMILY = Family("sd3", "Stable Diffusion 3 / 3.5", ("sd3", "sd35-medium", "sd35-large"), "StableDiffusion3Pipeline",
                ("StableDiffusion3Pipeline",), "transformer", ("text_encoder", "text_encoder_2", "text_encoder_3"),
                conditioning=encode, denoising=DENOISING,
                kohya_prefixes={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_",
                                "text_encoder_3": "lora_te3_"},
                native_layouts=("diffusers",), written_layout="diffusers")
