"""The lab's tiny text-to-image model: a real ``StableDiffusionPipeline`` at toy scale.

Every component is the class Stable Diffusion 1.x uses -- ``UNet2DConditionModel`` with
cross-attention transformer blocks (``attn1``/``attn2``, ``to_q/to_k/to_v/to_out.0``,
``ff.net.0.proj``/``ff.net.2``, ``proj_in``/``proj_out``), ``AutoencoderKL``, ``CLIPTextModel`` +
``CLIPTokenizer`` and diffusers schedulers -- so LoRA files, module names and analysis code written
for SD 1.5 run unchanged on the lab model, only smaller.

Sizes (chosen from CPU timings on 2 cores, see ``scripts/train_lab.py``): 32x32 RGB images,
a VAE with 4x downsampling (latents 4x8x8), a (32, 64)-channel UNet, and a 2-layer CLIP text
encoder of width 64 over the world's word-level vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from auditkit.lab.tokenizer import MAX_LENGTH

IMAGE_SIZE = 32
LATENT_SIZE = 8
TEXT_WIDTH = 64

UNET_CONFIG: dict[str, Any] = {
    "sample_size": LATENT_SIZE,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": 4,  # diffusers quirk: for this class it is the number of heads
    "norm_num_groups": 16,
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": IMAGE_SIZE,
}

# Training schedule (SD 1.x's) -- the pipeline ships a DDIM scheduler with the same betas.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}
SAMPLER_EXTRA: dict[str, Any] = {"set_alpha_to_one": False}  # DDIM-only option, as in SD 1.x

def text_config(vocab_size: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 2 * TEXT_WIDTH,
        "projection_dim": TEXT_WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_LENGTH,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }


def build_components(seed: int = 0, tokenizer_dir: str | Path | None = None) -> dict[str, Any]:
    """Freshly initialised (untrained) pipeline components, deterministic from ``seed``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from auditkit.lab.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(len(tokenizer))))
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}


def assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler=None):
    """A ``StableDiffusionPipeline`` (DDIM sampling, no safety checker) from trained parts."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sampler = DDIMScheduler(**SCHEDULER_CONFIG, **SAMPLER_EXTRA) if scheduler is None else scheduler
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sampler,
        safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )


def lab_pipeline_path() -> Path:
    """Folder of the shipped lab pipeline (``save_pretrained`` layout)."""
    from auditkit.lab.bases import LAB_BASES

    return LAB_BASES["lab"].path()


def lab_pipeline_available() -> bool:
    path = lab_pipeline_path()
    return (path / "model_index.json").is_file() and (path / "unet").is_dir()


def load_lab_pipeline(device: str = "cpu", dtype=None, path: str | Path | None = None):
    """Load the shipped (or another saved) lab pipeline.

    Args:
        device: torch device for all components.
        dtype: torch dtype (default ``torch.float32``; the lab is trained in fp32).
        path: a ``save_pretrained`` folder; default :func:`lab_pipeline_path`.

    Example:
        >>> pipe = load_lab_pipeline()  # doctest: +SKIP
        >>> pipe("a red cross", num_inference_steps=25, guidance_scale=5.0).images[0].size
        (32, 32)
    """
    import torch
    from diffusers import StableDiffusionPipeline

    path = Path(path) if path is not None else lab_pipeline_path()
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no lab pipeline at {path}; train and export it with scripts/train_lab.py")
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path), dtype=dtype or torch.float32, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, use_safetensors=True)  # never a pickle .bin
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
