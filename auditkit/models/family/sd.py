"""Stable Diffusion 1.x / 2.x: ``StableDiffusionPipeline``, a UNet (the shared ε-prediction record,
:data:`auditkit.models.denoising.UNET`) and one CLIP text encoder whose last hidden state over the padded
prompt is the conditioning (``encoder_hidden_states``). The shipped lab model is of this family."""

from __future__ import annotations

from auditkit.models.conditioning import Conditioning, token_ids
from auditkit.models.denoising import UNET
from auditkit.models.family.record import Family


def encode(pipe, prompts: list[str]) -> Conditioning:
    """The text encoder's last hidden state over the padded prompt (all positions)."""
    import torch

    ids = token_ids(pipe.tokenizer, prompts, pipe.tokenizer.model_max_length)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]
    return Conditioning(hidden, tokens=((pipe.tokenizer, ids),))


FAMILY = Family("sd", "Stable Diffusion 1.x / 2.x", ("sd15", "sd2"), "StableDiffusionPipeline",
                ("StableDiffusionPipeline",), "unet", ("text_encoder",),
                load_options={"safety_checker": None, "requires_safety_checker": False},
                conditioning=encode, denoising=UNET)
