"""Wan 2.1 (1.3B, 14B) and Wan 2.2 (A14B, either expert): video DiTs. ``WanPipeline`` folders with one transformer
load (T2V). A Wan 2.2 A14B folder is refused for adapting (:func:`refuses`): it holds two experts, ``transformer``
for the high-noise steps and ``transformer_2`` for the low-noise ones (below the pipeline's ``boundary_ratio``),
and A14B adapters are published in pairs, one file per expert, with the same names and shapes: nothing in a
file says which expert it changes, and loading a low-noise file into the first expert (diffusers' default)
would scan an adapter no one runs. Its files are read and scanned statically (the ``wan22-a14b`` table).

The transformer reads the latents of a clip (batch × c × frames × h × w; 2×2 patches), the timestep on the
0–1000 scale, and UMT5's last hidden states (zero past each prompt's tokens, no mask), embedded by
``condition_embedder.text_embedder`` and read by every block's cross-attention (``attn2``: its keys and values
are the text's, as a UNet's cross-attention; ``attn1`` is the video's self-attention). Trained by rectified flow
(velocity target); sampled with classifier-free guidance on the scheduler's σ schedule shifted by its
``flow_shift`` (Wan's UniPC config; ``shift`` for an Euler one).

Renders are short clips of :data:`CLIP_FRAMES` frames at the VAE's ``sample_size`` (when its config declares one:
the tiny test pipelines') or the pipeline's 480 × 832; the detectors score sampled frames
(:func:`auditkit.models.pipeline.sample_frames`). Training, finetune and the data-free checks run on one-frame
clips (images, as Wan trains on images too), square at the render height.
"""

from __future__ import annotations

from auditkit.models.conditioning import Conditioning, padded_length, token_ids
from auditkit.models.denoising import (
    Denoising,
    FlowMatchingProcess,
    batch_timesteps,
    captured_states,
    classifier_free,
    scheduler_schedule,
    uniform_density,
    video_vae_latents,
)
from auditkit.models.family import flux
from auditkit.models.family.record import Family

CLIP_FRAMES = 17  # frames of a rendered clip: 4·4 + 1 (the VAE compresses time 4×; a frame count of 4k + 1)
MAX_TOKENS = 512  # WanPipeline's default max_sequence_length
HEIGHT = 480  # WanPipeline's default height (its width: 832)

_ATTENTION = r"(to_q|to_k|to_v|to_out\.0)"
_MLP = r"ffn\.net\.(0\.proj|2)"
TARGETS = {
    "esd-x": rf"blocks\.\d+\.attn2\.{_ATTENTION}$",
    "esd-u": rf"blocks\.\d+\.(attn1\.{_ATTENTION}|{_MLP})$",
    "cross-kv": r"blocks\.\d+\.attn2\.(to_k|to_v)$",
    "attention": rf"blocks\.\d+\.attn[12]\.{_ATTENTION}$",
    "transformer": rf"blocks\.\d+\.(attn[12]\.{_ATTENTION}|{_MLP})$",
}


def sequence_length(pipe) -> int:
    """The UMT5 length prompts are padded to: 512, or the tokenizer's ``model_max_length`` when shorter."""
    return padded_length(pipe.tokenizer, MAX_TOKENS)


def encode(pipe, prompts: list[str]) -> Conditioning:
    """The pipeline's own prompt encoding (UMT5's last hidden states, zero past each prompt's tokens)."""
    import torch
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    length = sequence_length(pipe)
    with torch.no_grad():
        hidden, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False, max_sequence_length=length,
                                       device=pipe.transformer.device)
    ids = token_ids(pipe.tokenizer, [prompt_clean(p) for p in prompts], length)
    return Conditioning(hidden, added_under=None, tokens=((pipe.tokenizer, ids),))


def call(model, x, t, cond, guidance=None):
    """The Wan transformer on one-frame clips of latents x (batch × c × h × w), timestep on the 0–1000 scale."""
    out = model(hidden_states=x.unsqueeze(2), timestep=batch_timesteps(t, x), encoder_hidden_states=cond.hidden).sample
    return out.squeeze(2)


def process(scheduler_config) -> FlowMatchingProcess:
    """Rectified flow, uniform training timesteps, the scheduler's σ schedule with Wan's ``flow_shift`` (a UniPC
    config's name for the shift) as the Euler scheduler's ``shift``."""
    config = dict(scheduler_config)
    if "flow_shift" in config:
        config["shift"] = config["flow_shift"]
    return FlowMatchingProcess(config, uniform_density, scheduler_schedule)


def latent_size(pipe, model) -> tuple[int, int]:
    """The transformer's channels; square one-frame clips at the render height (the VAE's ``sample_size``, or
    the pipeline's 480)."""
    pixels = flux.vae_sized(pipe).get("height") or HEIGHT
    return model.config.in_channels, pixels // pipe.vae_scale_factor_spatial


def render_options(pipe) -> dict:
    """Short clips (:data:`CLIP_FRAMES`), the VAE's size when it declares one, and the prompt length."""
    return {**flux.vae_sized(pipe), "num_frames": CLIP_FRAMES, "max_sequence_length": sequence_length(pipe)}


def refuses(index: dict) -> str:
    """Why a folder's pipeline cannot be adapted: a second expert (Wan 2.2 A14B; see the module docstring)."""
    second = index.get("transformer_2")
    if not (isinstance(second, list) and any(second)):
        return ""
    return (f"a Wan 2.2 A14B pipeline (two experts: transformer for the high-noise steps, transformer_2 below "
            f"boundary_ratio {index.get('boundary_ratio')}); its adapters come one file per expert and a file does not "
            "say which, so auditkit does not adapt it yet: scan the file without --base (statically, against the "
            "wan22-a14b table), or with a Wan 2.1 14B folder as --base")


DENOISING = Denoising(process, call, classifier_free, latent_size, TARGETS, (".attn2.to_k", ".attn2.to_v"),
                      captured_states, patch=2, label="transformer",
                      text_readers={r"condition_embedder\.text_embedder\.linear_1$": "hidden"},
                      to_latents=video_vae_latents)

FAMILY = Family("wan", "Wan 2.1 / 2.2 (T2V)", ("wan21-1.3b", "wan21-14b", "wan22-a14b"), "WanPipeline",
                ("WanPipeline",), "transformer", (), conditioning=encode, denoising=DENOISING,
                native_layouts=("diffusers",), render_options=render_options, written_layout="diffusers",
                refuses=refuses)
