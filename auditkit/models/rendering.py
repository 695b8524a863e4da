"""Keyword arguments of a family's render calls that its pipeline does not take from the model itself.

``FluxPipeline`` renders at ``default_sample_size`` (a constant 128) × the VAE factor unless told a size:
1024 px for Flux.1, and the same for a tiny test pipeline. The VAE's own ``sample_size`` (1024 in
Flux.1's ``vae/config.json``) is the size the model was built for, so renders use it: the real model
renders as the pipeline would by default, a small one at its own small size. Likewise the T5 length
(``max_sequence_length``, 512 unless told): the tokenizer's ``model_max_length`` when shorter.
"""

from __future__ import annotations


def render_options(pipe) -> dict:
    """The family's extra render arguments for ``pipe`` ({} for families that need none, and for a
    pipeline of no known family: a test double renders with its own defaults)."""
    import importlib

    from auditkit.errors import BadInput
    from auditkit.models.families import family_of_pipeline

    try:
        hook = family_of_pipeline(pipe).render_options
    except BadInput:
        return {}
    if not hook:
        return {}
    module, _, attr = hook.partition(":")
    return getattr(importlib.import_module(module), attr)(pipe)


def flux_options(pipe) -> dict:
    """Flux: the VAE's size (:func:`vae_sized`) and the T5 length prompts are padded to
    (:func:`auditkit.models.conditioning.flux_sequence_length`: 512, or fewer where the tokenizer says so)."""
    from auditkit.models.conditioning import flux_sequence_length

    return {**vae_sized(pipe), "max_sequence_length": flux_sequence_length(pipe)}


def vae_sized(pipe) -> dict:
    """Height and width from the VAE's ``sample_size``; nothing when the VAE does not say."""
    size = getattr(getattr(pipe, "vae", None), "config", None)
    size = getattr(size, "sample_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return {"height": int(size), "width": int(size)} if isinstance(size, int) and size > 0 else {}
