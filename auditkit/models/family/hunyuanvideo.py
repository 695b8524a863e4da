"""HunyuanVideo 1.5 (T2V): ``HunyuanVideo15Pipeline``, a video DiT of double-stream blocks (video and text streams,
joint attention: the text's keys and values the video reads are ``attn.add_k_proj``/``add_v_proj``) whose original
module names are its diffusers paths.

Conditioning (the pipeline's own ``encode_prompt``): Qwen2.5-VL's third-to-last hidden states of the prompt in a
chat template whose system prompt (the first 108 tokens, ``prompt_template_encode_start_idx``) is cropped, padded to
1000 positions with a mask (``encoder_attention_mask``), and ByT5's encoding of the prompt's quoted text (glyphs;
zeros and an empty mask when the prompt quotes nothing: ``encoder_hidden_states_2``/``encoder_attention_mask_2``).
The transformer refines the Qwen states (``context_embedder``: ``proj_in``, then text-only refiner blocks), then
joins the valid tokens of the image, glyph and Qwen streams ahead of the padding.

The call: the latents (batch × c × frames × h × w) concatenated along channels with the condition latents and their
mask (zeros for text-to-video: ``prepare_cond_latents_and_mask``), ``image_embeds`` zeros (729 SigLIP tokens: the
T2V marker), the timestep on the 0–1000 scale. Trained by rectified flow (velocity target; uniform timesteps, as
auditkit trains Wan); sampled as ``__call__`` sets the sigmas, ``linspace(1, 0, steps + 1)[:-1]`` shifted by the
scheduler's ``shift``. Latents are the VAE's means × its ``scaling_factor`` (the pipeline divides by it to decode).

Guidance: the pipeline guides through its ``guider`` component (a diffusers ``ClassifierFreeGuidance``), not a
call argument: the suite's guidance is set on a copy of it for each render (``Family.guider``,
:func:`auditkit.models.pipeline.guided`); sampling by hand combines the two predictions with the pipeline's guider
at that scale (:func:`guide`: its formulation and rescale, every step).

Adapters: diffusers 0.42's ``HunyuanVideo15Pipeline`` has no LoRA loader mixin, its transformer has PEFT's
``PeftAdapterMixin``: adapters load through the transformer (``Family.loras_through_denoiser``:
:class:`auditkit.models.attach.DenoiserLoras` gives the dynamic scan diffusers' pipeline calls on it,
``load_lora_adapter(file, prefix="transformer")``, ``set_adapters``, ``fuse_lora``, …), coverage-checked and
scale-corrected as every family's; a file in diffusers' layout (``transformer.<path>.lora_A.weight``) is handed over
as it is, any other as auditkit's exact conversion. The text encoders are not tabled.

Renders are short clips of :data:`CLIP_FRAMES` frames at the VAE's ``sample_size`` (when its config declares one:
the tiny test pipelines') or the pipeline's default size (16:9 at the transformer's ``target_size``); the detectors
score sampled frames. Training, finetune and the data-free checks run on one-frame clips, square at the render
height. The data-free concept check reads the text stream's keys and values at the Qwen positions (the glyph and
image tokens are not the prompt's words).
"""

from __future__ import annotations

from auditkit.models.conditioning import Conditioning, padded_length
from auditkit.models.denoising import (
    MMDIT_TEXT_KV,
    Denoising,
    FlowMatchingProcess,
    batch_timesteps,
    captured_states,
    uniform_density,
)
from auditkit.models.family import flux
from auditkit.models.family.record import Family

CLIP_FRAMES = 17  # frames of a rendered clip: 4·4 + 1 (the published VAE compresses time 4×)
VISION_TOKENS = 729  # HunyuanVideo15Pipeline.vision_num_semantic_tokens: zero image embeddings mark text-to-video
MASK, GLYPHS, GLYPH_MASK = "encoder_attention_mask", "encoder_hidden_states_2", "encoder_attention_mask_2"

_TEXT_ATTENTION = r"attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_VIDEO_ATTENTION = r"attn\.(to_q|to_k|to_v|to_out\.0)"
_MLP = r"ff(_context)?\.net\.(0\.proj|2)"
# the double-stream blocks only (anchored: the token refiner's blocks read the prompt alone, and are not ESD-u's)
TARGETS = {
    "esd-x": rf"transformer_blocks\.\d+\.{_TEXT_ATTENTION}",
    "esd-u": rf"transformer_blocks\.\d+\.({_VIDEO_ATTENTION}|{_MLP})",
    "cross-kv": r"transformer_blocks\.\d+\.attn\.(add_k_proj|add_v_proj)",
    "attention": rf"transformer_blocks\.\d+\.({_TEXT_ATTENTION}|{_VIDEO_ATTENTION})",
    "transformer": rf"transformer_blocks\.\d+\.({_TEXT_ATTENTION}|{_VIDEO_ATTENTION}|{_MLP})",
}


def encode(pipe, prompts: list[str]) -> Conditioning:
    """The pipeline's own prompt encoding: Qwen2.5-VL's states of the templated prompt after the cropped system
    prompt (1000 positions, masked past the prompt) and ByT5's glyph states and mask, as ``__call__`` hands them to
    the transformer."""
    import torch

    with torch.no_grad():
        hidden, mask, glyphs, glyph_mask = pipe.encode_prompt(list(prompts), device=pipe.transformer.device,
                                                              dtype=pipe.transformer.dtype, batch_size=len(prompts))
    return Conditioning(hidden, {MASK: mask, GLYPHS: glyphs, GLYPH_MASK: glyph_mask}, added_under=None,
                        tokens=((pipe.tokenizer, token_ids(pipe, prompts)),))


def token_ids(pipe, prompts: list[str]):
    """The ids of the positions :func:`encode` keeps: the templated prompts tokenized as the pipeline tokenizes them
    (padded to the crop plus its 1000 positions), the system prompt's tokens cropped."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

    crop = pipe.prompt_template_encode_start_idx
    ids = pipe.tokenizer.apply_chat_template(format_text_input(list(prompts), pipe.system_message),
                                             add_generation_prompt=True, tokenize=True, return_dict=True,
                                             padding="max_length", max_length=pipe.tokenizer_max_length + crop,
                                             truncation=True, return_tensors="pt").input_ids
    return ids[:, crop:]


def _inputs(x, cond) -> dict:
    """The transformer's keyword arguments for one-frame clips of latents x (batch × c × h × w): the latents with
    zero condition latents and mask (text-to-video), zero image embeddings, the conditioning."""
    import torch

    clip = x.unsqueeze(2)
    b, _, f, h, w = clip.shape
    return {"hidden_states": torch.cat([clip, torch.zeros_like(clip), clip.new_zeros(b, 1, f, h, w)], dim=1),
            "encoder_hidden_states": cond.hidden, **cond.added}


def call(model, x, t, cond, guidance=None):
    """The HunyuanVideo 1.5 transformer on one-frame clips of latents x (batch × c × h × w), timestep on the 0–1000
    scale, as ``__call__`` calls it for text-to-video."""
    image = x.new_zeros(x.shape[0], VISION_TOKENS, model.config.image_embed_dim)
    out = model(**_inputs(x, cond), image_embeds=image, timestep=batch_timesteps(t, x).to(x.dtype)).sample
    return out.squeeze(2)



def guide(den, x, t, cond, neg, scale: float):
    """The pipeline's guidance: its ``guider`` at ``scale`` combining the conditional prediction and the empty
    prompt's (classifier-free: ε_neg + scale·(ε_cond − ε_neg), or the guider's own formulation and rescale)."""
    import torch

    e_neg, e_cond = den.predict(torch.cat([x, x]), t, Conditioning.cat([neg, cond])).chunk(2)
    return den.pipe.guider.new(guidance_scale=scale).forward(pred_cond=e_cond, pred_uncond=e_neg).pred


def sigma_schedule(sched, steps: int, image_tokens: int) -> None:
    """``__call__``'s sigmas: linspace(1, 0, steps + 1) without its last, shifted by the scheduler."""
    import numpy as np

    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])


def process(scheduler_config) -> FlowMatchingProcess:
    """Rectified flow, uniform training timesteps, the pipeline's σ schedule."""
    return FlowMatchingProcess(scheduler_config, uniform_density, sigma_schedule)


def to_latents(vae, x):
    """The VAE's means of one-frame clips × its ``scaling_factor`` (the pipeline decodes latents / scaling_factor):
    N × C × h × w, one clip at a time (:func:`on_load`)."""
    import torch

    means = [vae.encode(clip).latent_dist.mean.float()[:, :, 0] for clip in x.unsqueeze(2).split(1)]
    return torch.cat(means) * vae.config.scaling_factor


def on_load(pipe) -> None:
    """Sliced VAE decoding (one clip at a time): the attention of diffusers 0.42's ``AutoencoderKLHunyuanVideo15``
    broadcasts its causal mask (batch × n × n) against batch × 1 × n × n queries, so a batch of more than one clip
    fails to decode (RuntimeError: shape [2, 1, n, n] vs [2, 2, n, n]).

    And the lengths prompts are padded to, by every family's rule (:func:`~auditkit.models.conditioning.
    padded_length`): the pipeline's 1000 Qwen positions and 256 ByT5 ones, or fewer where a tokenizer's
    ``model_max_length`` says so (less the cropped system prompt). The pipeline has no ``max_sequence_length``
    argument, so its attributes are set; the published tokenizers' limits are far larger, which leaves them as
    they are."""
    pipe.vae.enable_slicing()
    crop = pipe.prompt_template_encode_start_idx
    pipe.tokenizer_max_length = padded_length(pipe.tokenizer, pipe.tokenizer_max_length, crop)
    pipe.tokenizer_2_max_length = padded_length(pipe.tokenizer_2, pipe.tokenizer_2_max_length)


def text_states(den, cond, names: list[str], visit, steps: int, generator) -> None:
    """The text stream's inputs of each double block's projections along the base's trajectory
    (:func:`~auditkit.models.denoising.captured_states`) at the conditioning's positions. The transformer puts each
    prompt's valid tokens first, image (none: text-to-video), glyphs, then Qwen's, the padding after them: the Qwen
    rows are taken back to their positions; zero rows where the prompt is padded (masked: the video reads nothing
    there)."""
    mask = cond.added[MASK].bool()
    glyphs = cond.added[GLYPH_MASK].bool().sum(dim=1).tolist()

    def aligned(name, rows):
        out = rows.new_zeros(mask.shape[0], mask.shape[1], rows.shape[2])
        for i, start in enumerate(glyphs):
            n = int(mask[i].sum())
            out[i, mask[i]] = rows[i, start:start + n]
        visit(name, out)

    captured_states(den, cond, names, aligned, steps, generator)


def render_height(pipe) -> int:
    """The VAE's ``sample_size`` when its config declares one, else the height of the pipeline's default size."""
    default = pipe.video_processor.calculate_default_height_width(pipe.default_aspect_ratio[1],
                                                                  pipe.default_aspect_ratio[0], pipe.target_size)
    return flux.vae_sized(pipe).get("height") or default[0]


def latent_size(pipe, model) -> tuple[int, int]:
    """The VAE's latent channels; square one-frame clips at the render height."""
    return pipe.num_channels_latents, render_height(pipe) // pipe.vae_scale_factor_spatial


def render_options(pipe) -> dict:
    """Short clips (:data:`CLIP_FRAMES`) and the VAE's size when it declares one."""
    return {**flux.vae_sized(pipe), "num_frames": CLIP_FRAMES}


DENOISING = Denoising(process, call, guide, latent_size, TARGETS, MMDIT_TEXT_KV, text_states, label="transformer",
                      text_readers={r"context_embedder\.proj_in": "hidden"}, to_latents=to_latents)

FAMILY = Family("hunyuanvideo15", "HunyuanVideo 1.5 (T2V)", ("hunyuanvideo15",), "HunyuanVideo15Pipeline",
                ("HunyuanVideo15Pipeline",), "transformer", (), conditioning=encode, denoising=DENOISING,
                native_layouts=("diffusers",), render_options=render_options, written_layout="diffusers",
                guider="guider", loras_through_denoiser=True, on_load=on_load)
