"""Tiny random-initialised pipelines of each model family, built from config with the real diffusers
and transformers classes (as diffusers' own tests do in ``get_dummy_components``) and saved as
``save_pretrained(safe_serialization=True)`` folders, so tests load them the way ``--base DIR`` does.

Nothing is downloaded: the tokenizers are the lab's word-level CLIP tokenizer
(:mod:`auditkit.lab.tokenizer`), so prompts made of lab-world words tokenise to one token per word.

The SDXL pipeline keeps SDXL's structure at toy size: a first down block without attention and a last
up block without attention (so kohya's SGM block numbering and diffusers' conversion of it apply as
for the real model), ``layers_per_block`` 2, two transformer layers in the attention block, the
``text_time`` added conditioning, and two text encoders of different widths whose penultimate hidden
states are concatenated for cross-attention (16 + 24 = 40) while the second one's projection (24) is
the pooled embedding.

The Flux.1 pipeline keeps Flux's structure: two double-stream (MMDiT) blocks and two single-stream blocks,
the guidance embedder (as FLUX.1-dev), a CLIP text encoder whose pooled output conditions the modulation
and a T5 encoder whose hidden states are the text tokens; the VAE halves the size (32x32 images, 16x16
latents packed into 8x8 tokens) and its ``sample_size`` is the size the runner renders at.

The SD3 pipeline is SD3.5-Medium-like (MMDiT-X): two joint blocks, a second image self-attention in the
first, the last block context-pre-only (no text MLP, a two-chunk text modulation), two CLIP text encoders
with projections whose pooled outputs are concatenated and a T5 encoder.
"""

from __future__ import annotations

from pathlib import Path

TE1_WIDTH, TE2_WIDTH = 16, 24
TIME_EMBED_DIM = 8

SDXL_UNET = {
    "sample_size": 16,  # 16x16 latents, 32x32 images (VAE factor 2): the lab detector's size
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (8, 16),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "cross_attention_dim": TE1_WIDTH + TE2_WIDTH,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + TE2_WIDTH,  # 6 time ids + pooled text
    "norm_num_groups": 4,
}

SDXL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (8, 16),
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 32,
}

SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
             "timestep_spacing": "leading"}


def _text_config(width: int, vocab_size: int) -> dict:
    from auditkit.lab.tokenizer import MAX_LENGTH

    return {"vocab_size": vocab_size, "hidden_size": width, "intermediate_size": 2 * width,
            "projection_dim": width, "num_hidden_layers": 2, "num_attention_heads": 2,
            "max_position_embeddings": MAX_LENGTH, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
            "hidden_act": "gelu"}


def tiny_sdxl_components(seed: int = 0) -> dict:
    """The components of a tiny ``StableDiffusionXLPipeline``, deterministic from ``seed``."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from auditkit.lab.tokenizer import build_tokenizer

    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SDXL_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**SDXL_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(TE1_WIDTH, len(tokenizer))))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_text_config(TE2_WIDTH, len(tokenizer_2))))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "scheduler": EulerDiscreteScheduler(**SCHEDULER),
            "image_encoder": None, "feature_extractor": None}


def tiny_sdxl_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny SDXL pipeline and save it to ``folder`` (safetensors weights); returns the folder."""
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


FLUX_WIDTH, FLUX_TEXT, FLUX_POOLED = 16, 24, 16  # transformer width, T5 width, CLIP (pooled) width

FLUX_TRANSFORMER = {
    "patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 8,
    "num_attention_heads": 2, "joint_attention_dim": FLUX_TEXT, "pooled_projection_dim": FLUX_POOLED,
    "guidance_embeds": True, "axes_dims_rope": (2, 2, 4),
}

FLUX_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (8, 16), "latent_channels": 4,
    "norm_num_groups": 4, "sample_size": 32, "use_quant_conv": False, "use_post_quant_conv": False,
    "shift_factor": 0.0609, "scaling_factor": 1.5035,
}


def tiny_flux_components(seed: int = 0) -> dict:
    """The components of a tiny ``FluxPipeline``, deterministic from ``seed``."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from auditkit.lab.tokenizer import build_tokenizer

    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()  # offline stand-ins for CLIP's and T5's
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**FLUX_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(FLUX_POOLED, len(tokenizer))))
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=FLUX_TEXT, d_ff=32, d_kv=8,
                                             num_heads=3, num_layers=2, feed_forward_proj="gated-gelu",
                                             pad_token_id=1, eos_token_id=1, decoder_start_token_id=0))
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "scheduler": FlowMatchEulerDiscreteScheduler(),
            "image_encoder": None, "feature_extractor": None}


def tiny_flux_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny Flux.1 pipeline and save it to ``folder`` (safetensors weights); returns the folder."""
    from diffusers import FluxPipeline

    folder = Path(folder)
    FluxPipeline(**tiny_flux_components(seed)).save_pretrained(folder, safe_serialization=True)
    return folder


SD3_WIDTH, SD3_CLIP, SD3_T5 = 16, 8, 32  # transformer width, each CLIP's width, T5 width (≥ the two CLIPs')

SD3_TRANSFORMER = {  # SD3.5-Medium-like: a second attention in block 0, RMS q/k norms; the last block context-pre-only
    "sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
    "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": SD3_T5,
    "caption_projection_dim": SD3_WIDTH, "pooled_projection_dim": 2 * SD3_CLIP, "pos_embed_max_size": 16,
    "dual_attention_layers": (0,), "qk_norm": "rms_norm",
}


def tiny_sd3_components(seed: int = 0) -> dict:
    """The components of a tiny ``StableDiffusion3Pipeline``, deterministic from ``seed``."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from auditkit.lab.tokenizer import build_tokenizer

    tokenizers = [build_tokenizer() for _ in range(3)]
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**SD3_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**FLUX_VAE)
    encoders = []
    for k in range(2):
        torch.manual_seed(seed + 2 + k)
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**_text_config(SD3_CLIP, len(tokenizers[k])))))
    torch.manual_seed(seed + 4)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizers[2]), d_model=SD3_T5, d_ff=32, d_kv=8, num_heads=4,
                                 num_layers=2, feed_forward_proj="gated-gelu", pad_token_id=1, eos_token_id=1,
                                 decoder_start_token_id=0))
    return {"transformer": transformer, "vae": vae, "text_encoder": encoders[0], "text_encoder_2": encoders[1],
            "text_encoder_3": t5, "tokenizer": tokenizers[0], "tokenizer_2": tokenizers[1],
            "tokenizer_3": tokenizers[2], "scheduler": FlowMatchEulerDiscreteScheduler(),
            "image_encoder": None, "feature_extractor": None}


def tiny_sd3_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny SD3 pipeline and save it to ``folder`` (safetensors weights); returns the folder."""
    from diffusers import StableDiffusion3Pipeline

    folder = Path(folder)
    StableDiffusion3Pipeline(**tiny_sd3_components(seed)).save_pretrained(folder, safe_serialization=True)
    return folder
