"""Stable Diffusion XL (and fine-tunes: Pony, Illustrious, …): ``StableDiffusionXLPipeline``, a UNet (the
shared ε-prediction record, :data:`auditkit.models.denoising.UNET`) and two CLIP text encoders: both
encoders' penultimate hidden states concatenated, plus ``added_cond_kwargs``: the second encoder's pooled
projection (``text_embeds``) and the size/crop ids (``time_ids``: original size, crop corner, target size;
here the model's own image size and no crop, as the pipeline uses by default). kohya writes its UNet
modules under SGM block names (:func:`auditkit.models.architectures.sgm_name`)."""

from __future__ import annotations

from auditkit.models.conditioning import Conditioning, token_ids
from auditkit.models.denoising import UNET
from auditkit.models.family.record import Family


def encode(pipe, prompts: list[str]) -> Conditioning:
    """The pipeline's own prompt encoding (both encoders, penultimate layers, pooled projection) and the
    default size ids for the model's native resolution."""
    import torch

    unet = pipe.unet
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, device=unet.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    size = unet.config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=hidden.dtype, device=hidden.device)
    ids = token_ids(pipe.tokenizer, prompts, pipe.tokenizer.model_max_length)  # both encoders read the same positions
    return Conditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), 6)},
                        tokens=((pipe.tokenizer, ids),))


FAMILY = Family("sdxl", "Stable Diffusion XL (and fine-tunes: Pony, Illustrious, …)", ("sdxl",),
                "StableDiffusionXLPipeline", ("StableDiffusionXLPipeline",), "unet", ("text_encoder", "text_encoder_2"),
                conditioning=encode, denoising=UNET)
