"""The lab's second model: a real ``FluxPipeline`` (a diffusion transformer) at toy scale.

Same world, same VAE, same vocabulary as the SD-style lab (:mod:`auditkit.lab.model`), but the Flux.1
structure: a ``FluxTransformer2DModel`` with double-stream (MMDiT: text and image tokens attend jointly)
and single-stream blocks, trained with rectified flow (flow matching) and sampled with
``FlowMatchEulerDiscreteScheduler``; a CLIP text encoder whose pooled output modulates the blocks and a
T5 encoder whose hidden states are the text tokens. LoRA files, module names and the analysis written for
Flux.1 run on it unchanged, only smaller.

Choices (toy scale, CPU):

* the shipped lab VAE (32x32 images -> 4x8x8 latents) with a ``shift_factor``/``scaling_factor`` measured
  on the world's latents; Flux packs 2x2 latent patches into one token, so the transformer reads 16
  channels and an image is 16 tokens;
* guidance-distilled like Flux.1-dev: trained first without a guidance input (flow matching, 10% caption
  dropout), then a guidance embedder learnt the classifier-free-guided prediction u + g (c - u) of that
  model in one pass (``scripts/train_lab.py`` stage ``dit-guidance``). ``FluxPipeline`` and auditkit sample
  it as they sample Flux.1-dev: one pass per step with ``guidance_scale`` as the model's input; the empty
  prompt gives the unconditional prediction ESD needs;
* T5 reads the lab's word-level tokenizer too (``tokenizer_2``), padded to :data:`MAX_SEQUENCE_LENGTH`
  tokens. ``FluxPipeline`` pads T5 prompts to ``max_sequence_length`` (512 unless told): call it with
  ``max_sequence_length=16`` (auditkit does, from the tokenizer's ``model_max_length``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from auditkit.lab.bases import SAMPLING_GUIDANCE, SAMPLING_STEPS
from auditkit.lab.model import IMAGE_SIZE, TEXT_WIDTH, text_config
from auditkit.lab.tokenizer import MAX_LENGTH

MAX_SEQUENCE_LENGTH = MAX_LENGTH
HEAD_DIM = 32

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,  # 4 latent channels x a 2x2 patch
    "num_layers": 2,  # double-stream (MMDiT) blocks
    "num_single_layers": 2,
    "attention_head_dim": HEAD_DIM,
    "num_attention_heads": 4,  # width 128
    "joint_attention_dim": TEXT_WIDTH,  # T5's width
    "pooled_projection_dim": TEXT_WIDTH,  # CLIP's width
    "guidance_embeds": True,  # distilled after training (see the module docstring)
    "axes_dims_rope": (8, 12, 12),  # sums to the head dimension
}

T5_CONFIG: dict[str, Any] = {
    "d_model": TEXT_WIDTH, "d_ff": 2 * TEXT_WIDTH, "d_kv": 16, "num_heads": 4, "num_layers": 2,
    "feed_forward_proj": "gated-gelu", "pad_token_id": 1, "eos_token_id": 1, "decoder_start_token_id": 0,
}

# Flow matching as FluxPipeline uses it; no shift (shift 1, no dynamic shifting): 16 image tokens.
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}



def build_components(vae, seed: int = 0, tokenizer_dir: str | Path | None = None,
                     guidance_embeds: bool | None = None) -> dict[str, Any]:
    """Freshly initialised transformer and text encoders (deterministic from ``seed``) around ``vae``;
    ``guidance_embeds`` overrides :data:`TRANSFORMER_CONFIG`'s (training starts without one)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from auditkit.lab.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_dir)
    tokenizer_2 = build_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    config = dict(TRANSFORMER_CONFIG)
    if guidance_embeds is not None:
        config["guidance_embeds"] = guidance_embeds
    transformer = FluxTransformer2DModel(**config)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(len(tokenizer))))
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **T5_CONFIG))
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2, "tokenizer": tokenizer, "tokenizer_2": tokenizer_2,
            "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)}


def assemble_pipeline(parts: dict[str, Any]):
    """A ``FluxPipeline`` from :func:`build_components`' parts (no image encoder)."""
    from diffusers import FluxPipeline

    return FluxPipeline(**parts, image_encoder=None, feature_extractor=None)


def lab_dit_pipeline_path() -> Path:
    """Folder of the shipped DiT lab pipeline (``save_pretrained`` layout)."""
    from auditkit.lab.bases import LAB_BASES

    return LAB_BASES["lab-dit"].path()


def lab_dit_card_path() -> Path:
    return Path(str(resources.files("auditkit.lab").joinpath("assets").joinpath("lab_dit_card.json")))


def load_lab_dit_pipeline(device: str = "cpu", dtype=None, path: str | Path | None = None):
    """Load the shipped (or another saved) DiT lab pipeline.

    Example:
        >>> pipe = load_lab_dit_pipeline()  # doctest: +SKIP
        >>> pipe("a red cross", num_inference_steps=25, max_sequence_length=16,
        ...      height=32, width=32).images[0].size
        (32, 32)
    """
    import torch
    from diffusers import FluxPipeline

    path = Path(path) if path is not None else lab_dit_pipeline_path()
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no DiT lab pipeline at {path}; train and export it with scripts/train_lab.py "
                                "(stages latents,dit,dit-guidance,export-dit,eval-dit)")
    pipe = FluxPipeline.from_pretrained(str(path), dtype=dtype or torch.float32, use_safetensors=True,
                                        local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def render_kwargs(pipe, n: int, steps: int = SAMPLING_STEPS,
                  guidance: float = SAMPLING_GUIDANCE) -> dict[str, Any]:
    """Keyword arguments of a ``FluxPipeline`` call rendering ``n`` DiT lab images as its card measures them:
    a guidance-distilled transformer takes ``guidance`` as its input (``guidance_scale``, as FluxPipeline and
    auditkit sample Flux.1-dev); one without a guidance input is guided classifier-free
    (``true_cfg_scale`` against the empty prompt) when ``guidance`` > 1."""
    out: dict[str, Any] = {"num_inference_steps": steps, "height": IMAGE_SIZE, "width": IMAGE_SIZE,
                           "max_sequence_length": MAX_SEQUENCE_LENGTH}
    if pipe.transformer.config.guidance_embeds:
        out["guidance_scale"] = guidance
    elif guidance > 1:
        out.update(true_cfg_scale=guidance, negative_prompt=[""] * n)
    return out
