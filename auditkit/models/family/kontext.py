"""Flux.1 Kontext (dev): ``FluxKontextPipeline``, Flux.1's transformer, text encoders and training target (its
table says ``same_as`` flux), an edit pipeline: the input image's latents enter as extra image tokens (position
ids with a first coordinate of 1) beside the noisy ones, and only the noisy tokens' prediction is kept.

Renders: an edit suite's ``input_image`` (:class:`auditkit.suites.InputImage`) is center-cropped and resized to
the render size (square, the VAE's ``sample_size``, as Flux.1 renders) and given as ``image`` with Kontext's
automatic resizing off, so the output is the input's size; a suite without one renders from text alone (the
pipeline's text-to-image mode). ``max_area`` is the render size's area, so the pipeline keeps that size.

Training and the data-free checks (align, finetune, repair, concept and noise reversion) call the transformer
as Flux.1's, without context tokens: Kontext's text-to-image mode, the call its pipeline makes without an
image. The guidance is embedded (Kontext dev is guidance-distilled; the pipeline's default 3.5).
"""

from __future__ import annotations

from auditkit.models.family import flux
from auditkit.models.family.record import Family


def render_options(pipe) -> dict:
    """Flux.1's render options, the area the pipeline sizes its output by, and Kontext's resizing of the input
    to its preferred resolutions off (auditkit gives it the input at the render size)."""
    options = flux.render_options(pipe)
    if "height" in options:
        options["max_area"] = options["height"] * options["width"]
    return {**options, "_auto_resize": False}


def input_image(pipe, pixels) -> dict:
    """The input image (uint8 H × W × 3) center-cropped and resized to the render size."""
    from PIL import Image

    from auditkit.images import square

    size = flux.vae_sized(pipe).get("height") or 128 * pipe.vae_scale_factor  # the pipeline's default otherwise
    return {"image": Image.fromarray(square(Image.fromarray(pixels), size))}


FAMILY = Family("flux-kontext", "Flux.1 Kontext (dev)", ("flux-kontext",), "FluxKontextPipeline",
                ("FluxKontextPipeline",), "transformer", ("text_encoder", "text_encoder_2"),
                conditioning=flux.encode, denoising=flux.DENOISING, kohya_prefixes=flux.FAMILY.kohya_prefixes,
                native_layouts=("diffusers",), render_options=render_options, written_layout="diffusers",
                input_image=input_image)
