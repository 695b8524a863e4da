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


def t5_tokenizer():
    """A T5-like tokenizer of the lab words (``T5TokenizerFast`` over a unigram model, as T5's sentencepiece
    vocabulary: no start token, ``</s>`` after the prompt, ``<pad>`` 0, ``▁``-prefixed word pieces and single
    letters for any other word), a vocabulary other than CLIP's, for tests that need SD3's and Flux's T5 to
    read their own (the tiny pipelines' T5 reads the lab's CLIP tokenizer): 47 tokens, ids 0-2 special."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    from auditkit.lab.world import VOCABULARY

    words = list(dict.fromkeys(w.lower() for w in VOCABULARY))
    letters = sorted({c for w in words for c in w})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((f"\u2581{w}", -1.0) for w in words),
              ("\u2581", -3.0), *((c, -5.0) for c in letters)]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


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


def tiny_kontext_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """A tiny Flux.1 Kontext pipeline (the tiny Flux.1 components in ``FluxKontextPipeline``) saved to ``folder``."""
    from diffusers import FluxKontextPipeline

    folder = Path(folder)
    FluxKontextPipeline(**tiny_flux_components(seed)).save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_flux_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny Flux.1 pipeline and save it to ``folder`` (safetensors weights); returns the folder."""
    from diffusers import FluxPipeline

    folder = Path(folder)
    FluxPipeline(**tiny_flux_components(seed)).save_pretrained(folder, safe_serialization=True)
    return folder


def _tiny_t5(vocab_size: int, width: int, seed: int):
    """A tiny T5 encoder (2 layers, gated GELU) of ``width``, deterministic from ``seed``."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=width, d_ff=32, d_kv=8, num_heads=3, num_layers=2,
                                   feed_forward_proj="gated-gelu", pad_token_id=1, eos_token_id=1,
                                   decoder_start_token_id=0))


CHROMA_TRANSFORMER = {  # Flux.1's tiny transformer without the pooled projection and guidance inputs
    "patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 8,
    "num_attention_heads": 2, "joint_attention_dim": FLUX_TEXT, "axes_dims_rope": (2, 2, 4),
    "approximator_num_channels": 16, "approximator_hidden_dim": 32, "approximator_layers": 2,
}


def tiny_chroma_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny Chroma pipeline (Flux.1's tiny VAE, one T5) and save it to ``folder``; returns the folder."""
    import torch
    from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from auditkit.lab.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()  # an offline stand-in for T5's
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(**CHROMA_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**FLUX_VAE)
    pipe = ChromaPipeline(transformer=transformer, vae=vae, text_encoder=_tiny_t5(len(tokenizer), FLUX_TEXT, seed + 2),
                          tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler())
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


QWEN_TEMPLATE_WORDS = (  # QwenImagePipeline.prompt_template_encode, split as Qwen2's tokenizer splits it
    "system user assistant describe the image by detailing color , shape size texture quantity text spatial "
    "relationships of objects and background :").split()


# Qwen2's pre-tokenizer (its tokenizer.json's Split pattern): words with their leading space, single digits,
# punctuation runs, line breaks, and runs of spaces (all but the last space before a word: its own piece)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def chat_tokenizer(words=QWEN_TEMPLATE_WORDS, model_max_length: int = 64, qwen2_split: bool = False):
    """A word-level tokenizer of the lab words and a chat template's words, with Qwen's chat special tokens
    (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>`` as padding) and one token per word, punctuation mark and
    line break, as Qwen2's tokenizer splits QwenImagePipeline's template (whose system prompt is then the 34 tokens
    the pipeline drops). Saved as a plain ``tokenizer.json`` (``PreTrainedTokenizerFast``), so it loads as built.

    ``qwen2_split``: one token per piece of Qwen2's own pre-tokenizer (:data:`QWEN2_SPLIT`; runs of spaces are pieces
    too, and a word's leading space is dropped so a word is one token wherever it stands), each a single token of
    Qwen2's vocabulary for HunyuanVideo15Pipeline's system prompt: its 100 pieces, the 108 tokens with the template
    the pipeline crops (``words`` then lists the pieces)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from auditkit.lab.world import VOCABULARY

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = list(dict.fromkeys([*specials, "\n", *words, *(w.lower() for w in VOCABULARY)]))
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    model.normalizer = normalizers.Lowercase()
    if qwen2_split:
        model.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                       pre_tokenizers.Split(Regex(r"^ (?=\S)"), behavior="removed")])
    else:
        model.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r" +"), behavior="removed"),
                                                       pre_tokenizers.Split(Regex(r"\n|[^\s\w]"),
                                                                            behavior="isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   model_max_length=model_max_length)


QWEN_TEXT = 16  # Qwen2.5-VL's hidden size (the transformer's joint_attention_dim)

QWEN_TRANSFORMER = {
    "patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 8,
    "num_attention_heads": 2, "joint_attention_dim": QWEN_TEXT, "guidance_embeds": False, "axes_dims_rope": (2, 2, 4),
}

QWEN_VAE = {  # one spatial halving (VAE factor 2): 32x32 images, 16x16 latents of 4 channels
    "base_dim": 8, "z_dim": 4, "dim_mult": [1, 2], "num_res_blocks": 1, "temperal_downsample": [False],
    "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4,
}


def tiny_qwen_vl(vocab_size: int, seed: int):
    """A tiny Qwen2.5-VL (2 text layers of width 16, one vision block), deterministic from ``seed``."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {"vocab_size": vocab_size, "hidden_size": QWEN_TEXT, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, "rope_theta": 10000.0,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": QWEN_TEXT,
              "fullatt_block_indexes": [0], "patch_size": 2, "spatial_merge_size": 1, "temporal_patch_size": 1,
              "window_size": 4}
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                               vocab_size=vocab_size, hidden_size=QWEN_TEXT,
                                                               bos_token_id=1, eos_token_id=2, pad_token_id=0))


def tiny_qwen_image_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny Qwen-Image pipeline and save it to ``folder``; returns the folder. Its VAE config declares
    ``sample_size`` 32 (the published one declares none), the size auditkit renders it at."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tokenizer = chat_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**QWEN_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(**QWEN_VAE)
    vae.register_to_config(sample_size=32)
    pipe = QwenImagePipeline(transformer=transformer, vae=vae, text_encoder=tiny_qwen_vl(len(tokenizer), seed + 2),
                             tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler())
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# Qwen3's chat template as ZImagePipeline applies it (one user message, the generation prompt, thinking on)
QWEN3_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

Z_IMAGE_TEXT = 16  # Qwen3's hidden size (cap_feat_dim)

Z_IMAGE_TRANSFORMER = {  # two refiner layers of each kind (as the published model), two main layers
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 4, "dim": 16, "n_layers": 2,
    "n_refiner_layers": 2, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": Z_IMAGE_TEXT, "axes_dims": [2, 2, 4],
    "axes_lens": [64, 16, 16],
}


def tiny_qwen3(vocab_size: int, seed: int, width: int = Z_IMAGE_TEXT):
    """A tiny Qwen3 text model (2 layers), deterministic from ``seed``."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    return Qwen3Model(Qwen3Config(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def tiny_z_image_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny Z-Image pipeline (Flux.1's tiny VAE, a tiny Qwen3, a chat tokenizer padding prompts to 32
    tokens) and save it to ``folder``; returns the folder."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tokenizer = chat_tokenizer(("user", "assistant"), model_max_length=32)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**Z_IMAGE_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**FLUX_VAE)
    pipe = ZImagePipeline(transformer=transformer, vae=vae, text_encoder=tiny_qwen3(len(tokenizer), seed + 2),
                          tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler())
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# Qwen3's chat template as Flux2KleinPipeline applies it (thinking off: an empty think block after the prompt)
QWEN3_NO_THINKING_TEMPLATE = QWEN3_CHAT_TEMPLATE.replace(
    "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}")

FLUX2_TEXT = 8  # Qwen3's width: the transformer reads 3 of its layers side by side (joint_attention_dim 24)

FLUX2_TRANSFORMER = {
    "patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 8,
    "num_attention_heads": 2, "joint_attention_dim": 3 * FLUX2_TEXT, "timestep_guidance_channels": 16,
    "axes_dims_rope": (2, 2, 2, 2), "guidance_embeds": False,
}

FLUX2_VAE = {  # Flux.1's tiny VAE with Flux.2's batch-norm statistics of the 2×2-patchified latents
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (8, 16), "latent_channels": 4,
    "norm_num_groups": 4, "sample_size": 32, "use_quant_conv": False, "use_post_quant_conv": False,
}


def tiny_flux2_klein_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny Flux.2 Klein pipeline (a 27-layer Qwen3 of width 8, as the pipeline reads its layers 9, 18 and
    27; prompts padded to 32 tokens) and save it to ``folder``; returns the folder."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = chat_tokenizer(("user", "assistant", "<think>", "</think>"), model_max_length=32)
    tokenizer.chat_template = QWEN3_NO_THINKING_TEMPLATE
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(**FLUX2_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(**FLUX2_VAE)
    with torch.no_grad():  # batch-norm statistics other than the identity, so the normalisation is exercised
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=FLUX2_TEXT, intermediate_size=16,
                                                num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=4, max_position_embeddings=64, bos_token_id=1,
                                                eos_token_id=2, pad_token_id=0))
    pipe = Flux2KleinPipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=FlowMatchEulerDiscreteScheduler())
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


WAN_TEXT = 16  # UMT5's width (the transformer's text_dim)

WAN_TRANSFORMER = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4,
    "text_dim": WAN_TEXT, "freq_dim": 16, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32,
}

WAN_VAE = {  # one spatial and one temporal halving: 32x32 frames, 16x16 latents, 17 frames -> 9 latent frames
    "base_dim": 8, "z_dim": 4, "dim_mult": [1, 2], "num_res_blocks": 1, "temperal_downsample": [True],
    "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4, "scale_factor_spatial": 2, "scale_factor_temporal": 2,
}


def tiny_wan_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny Wan 2.1 T2V pipeline (a tiny UMT5 reading the T5-like lab tokenizer, prompts padded to 16
    tokens; its VAE config declares ``sample_size`` 32) and save it to ``folder``; returns the folder."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t5_tokenizer()
    tokenizer.model_max_length = 16
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**WAN_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(**WAN_VAE)
    vae.register_to_config(sample_size=32)
    torch.manual_seed(seed + 2)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=WAN_TEXT, d_ff=32, d_kv=8,
                                               num_heads=2, num_layers=2, feed_forward_proj="gated-gelu",
                                               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_wan22_a14b_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny Wan 2.2 A14B-like pipeline (the tiny Wan 2.1 one with a second expert, ``transformer_2``, for
    the steps below ``boundary_ratio`` 0.875, as the published A14B's) and save it to ``folder``."""
    import torch
    from diffusers import WanPipeline, WanTransformer3DModel

    one = WanPipeline.from_pretrained(tiny_wan_pipeline(Path(folder).with_name(Path(folder).name + "-first"), seed))
    torch.manual_seed(seed + 3)
    pipe = WanPipeline(tokenizer=one.tokenizer, text_encoder=one.text_encoder, vae=one.vae, transformer=one.transformer,
                       transformer_2=WanTransformer3DModel(**WAN_TRANSFORMER), scheduler=one.scheduler,
                       boundary_ratio=0.875)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# HunyuanVideo15Pipeline's system prompt as Qwen2's pre-tokenizer splits it (lowercased, leading spaces dropped,
# runs of spaces as pieces: chat_tokenizer's qwen2_split), with the chat template's roles
HUNYUAN_TEMPLATE_WORDS = (*(
    "system user assistant you are a helpful describe the video by detailing following aspects main content and "
    "theme of color shape size texture quantity text spatial relationships objects actions events behaviors "
    "temporal physical movement changes background environment light style atmosphere camera angles movements "
    "transitions used in 1 2 3 4 5 . : ,").split(), " " * 8, " ")

HUNYUAN_TEXT, HUNYUAN_BYT5 = 16, 32  # Qwen2.5-VL's hidden size (text_embed_dim), ByT5's d_model (text_embed_2_dim)

HUNYUAN_TRANSFORMER = {  # diffusers' own test's tiny config (tests/pipelines/hunyuan_video1_5), two blocks
    "in_channels": 9, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
    "num_refiner_layers": 1, "mlp_ratio": 2.0, "patch_size": 1, "patch_size_t": 1, "text_embed_dim": HUNYUAN_TEXT,
    "text_embed_2_dim": HUNYUAN_BYT5, "image_embed_dim": 12, "rope_axes_dim": (2, 2, 4), "target_size": 16,
    "task_type": "t2v",
}

HUNYUAN_VAE = {  # 4x spatial, 2x temporal: 32x32 frames, 8x8 latents of 4 channels, 17 frames -> 9 latent frames
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (16, 16), "layers_per_block": 1,
    "spatial_compression_ratio": 4, "temporal_compression_ratio": 2, "downsample_match_channel": False,
    "upsample_match_channel": False,
}


HUNYUAN_CROP = 108  # HunyuanVideo15Pipeline.prompt_template_encode_start_idx: the system prompt's tokens


def tiny_hunyuanvideo15_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny HunyuanVideo 1.5 T2V pipeline (a tiny Qwen2.5-VL text model reading a chat tokenizer split as
    Qwen2 splits, so the pipeline's crop of 108 tokens is exactly the system prompt; a tiny ByT5 with its own
    byte tokenizer; classifier-free guidance at 6.0; the VAE's config declares ``sample_size`` 32) and save it to
    ``folder``; returns the folder."""
    import torch
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    # prompts padded to 32 Qwen positions after the cropped system prompt and 32 ByT5 bytes (the pipeline's 1000 and
    # 256 read as ~2,000 text tokens a call: minutes of attention per tiny scan), by the tokenizers' model_max_length
    tokenizer = chat_tokenizer(HUNYUAN_TEMPLATE_WORDS, model_max_length=HUNYUAN_CROP + 32, qwen2_split=True)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE  # Qwen2.5-VL's, for messages of plain text with a system prompt
    tokenizer_2 = ByT5Tokenizer(model_max_length=32)
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(**HUNYUAN_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLHunyuanVideo15(**HUNYUAN_VAE)
    vae.register_to_config(sample_size=32)
    torch.manual_seed(seed + 2)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=HUNYUAN_TEXT, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, rope_theta=10000.0, bos_token_id=1,
        eos_token_id=2, pad_token_id=0))
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=HUNYUAN_BYT5, d_ff=32, d_kv=8,
                                             num_heads=2, num_layers=1, feed_forward_proj="gated-gelu",
                                             pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    pipe = HunyuanVideo15Pipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
                                  tokenizer_2=tokenizer_2, guider=ClassifierFreeGuidance(guidance_scale=6.0))
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
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


# --- shared end-to-end checks of training and the data-free checks, for any family ---------------
# The family contract (tests/models/test_family_contract.py) calls these with each family's pipeline.

CONCEPT_PROMPTS = ["a red cross", "a blue cross"]


def suite_yaml(name: str, role: str, prompts: list[str], guidance: float = 3.5, input_image: str = "") -> str:
    """A probe suite of the lab's cross concept (2 sampling steps, 2 images per prompt, the lab detector);
    ``input_image``: the suite's input_image value (an edit suite), none when empty."""
    return "\n".join([
        "schema: auditkit.suite/1", f"name: {name}", "version: 1",
        "concept: {word: cross, neutral: square, terms: [cross]}", "detector: lab-cross", f"role: {role}",
        f"sampling: {{steps: 2, guidance: {guidance}, seed: 7, images_per_prompt: 2}}",
        *([f"input_image: {input_image}"] if input_image else []),
        "prompts: [" + ", ".join(prompts) + "]", ""])


CROSS_SUITE = suite_yaml("tiny-cross", "concept", CONCEPT_PROMPTS)
NEON_SUITE = suite_yaml("tiny-neon", "control", ["a neon pink tee"])

def denoiser_state(pipe) -> dict:
    """A copy of the denoiser's state dict (to check that training leaves the pipeline as it was)."""
    from auditkit.models.pipeline import denoiser_of

    return {k: v.detach().clone() for k, v in denoiser_of(pipe).state_dict().items()}


def sampled_by_hand(pipe, prompts: list[str], steps: int, guidance: float, guided: bool, seed: int = 0):
    """The latents auditkit's denoiser for ``pipe`` (its call, guide, sampler and noise) reaches when stepped by hand
    from ``seed``: guided against empty prompts when ``guided`` (where the pipeline applies its guidance), else the
    conditional prediction alone; to compare with the pipeline's own loop (``output_type="latent"``)."""
    import torch

    from auditkit.models.pipeline import denoiser_for, encode

    den = denoiser_for(pipe)
    cond, neg = encode(pipe, prompts), encode(pipe, [""] * len(prompts))
    x = den.noise(len(prompts), torch.Generator().manual_seed(seed))
    sampler = den.sampler(steps)
    with torch.no_grad():
        for k, t in enumerate(sampler.timesteps):
            v = den.guided(x, t, cond, neg, guidance) if guided else den.predict(x, t, cond)
            x = sampler.step(v, k, x)
    return x


def lora_weights(pipe) -> dict:
    """A copy of every linear and conv weight of the components adapters change, by canonical module name (to
    check what loading, fusing and unloading an adapter did to them)."""
    import torch

    from auditkit.models.architectures import canonical_name
    from auditkit.models.pipeline import lora_components

    out = {}
    for component, model in lora_components(pipe).items():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                out[canonical_name(component, name.replace(".base_layer", ""))] = module.weight.detach().clone()
    return out


def assert_denoiser_unchanged(pipe, before: dict) -> None:
    import torch

    after = denoiser_state(pipe)
    assert set(after) == set(before), "adapter layers left behind"
    assert all(torch.equal(after[k], v) for k, v in before.items()), "the denoiser's weights changed"


def prediction_change(pipe, modules: dict) -> float:
    """max |prediction(base + modules) − prediction(base)| at one fixed point of the denoiser (seeded
    latents, the middle step of its sampler, the concept prompts)."""
    import torch

    from auditkit.models.attach import composed
    from auditkit.models.pipeline import denoiser_for, encode

    den = denoiser_for(pipe)
    cond = encode(pipe, CONCEPT_PROMPTS)
    sampler = den.sampler(4)
    x = den.noise(len(cond), torch.Generator().manual_seed(0))
    t = sampler.timesteps[2]
    with torch.no_grad():
        base = den.predict(x, t, cond)
        with composed(den.model, (modules, 1.0), component=den.component):
            changed = den.predict(x, t, cond)
    return float((changed - base).abs().max())


def image_caption_folder(folder, n: int = 4) -> Path:
    """``n`` lab-world images of the neon domain with their captions (32×32)."""
    from auditkit.lab import world
    from auditkit.train.data import write_folder

    specs = world.sample_specs(0, n, domain="neon")
    return write_folder(folder, world.render_many(specs), [world.caption(s) for s in specs])


def check_align(pipe, out: Path, text_modules: tuple[str, ...], frozen: tuple[str, ...] = ()) -> Path:
    """A 5-step ESD-x align on ``pipe``: it trains only the modules that read the prompt (names ending in
    ``text_modules``), moves B away from zero in each (except in ``frozen``, modules whose output the model
    drops, which keep exactly zero), changes the denoiser's prediction, leaves the pipeline as it was and
    writes a file that reads back and loads into the pipeline whole. Returns the file."""
    import numpy as np

    from auditkit.lora.adapter import read_adapter
    from auditkit.lora.write import save_adapter
    from auditkit.models.attach import load_adapters, unload_adapters
    from auditkit.models.families import family_of_pipeline
    from auditkit.models.pipeline import architecture_of
    from auditkit.train.esd import ESDConfig, train_esd

    before = denoiser_state(pipe)
    losses = []
    mods = train_esd(pipe, CONCEPT_PROMPTS, ESDConfig(method="esd-x", rank=2, steps=5, batch=2, ddim_steps=3, lr=1e-2),
                     progress=lambda s, n, loss: losses.append(loss))
    assert len(losses) == 5 and all(np.isfinite(losses))
    assert mods and all(n.endswith(text_modules) for n in mods), sorted(mods)
    assert set(frozen) <= set(mods)
    assert all((np.abs(m.up).sum() > 0) == (n not in frozen) for n, m in mods.items()), "B moved from zero"
    assert prediction_change(pipe, mods) > 1e-6
    assert_denoiser_unchanged(pipe, before)
    arch = architecture_of(pipe)
    path = save_adapter(mods, out, arch, family_of_pipeline(pipe).written_layout)  # as `auditkit align` writes it
    adapter = read_adapter(path, extra_architectures=(arch,))
    assert set(adapter.modules) == set(mods) and adapter.coverage.fraction == 1.0
    try:
        assert load_adapters(pipe, {"safety": adapter})["safety"]["fraction"] == 1.0
    finally:
        unload_adapters(pipe)
    return path


def check_finetune(pipe, data_folder, safety_path, mode: str, frozen: tuple[str, ...] = ()):
    """A 5-step LoRA fine-tune (``mode``): finite losses, B moved from zero in every module (but those in
    ``frozen``), an update that changes the denoiser's prediction, the pipeline left as it was. Returns
    the result."""
    import numpy as np

    from auditkit.lora.adapter import read_adapter
    from auditkit.models.pipeline import architecture_of
    from auditkit.train.data import load_folder
    from auditkit.train.finetune import FinetuneConfig, finetune

    data = load_folder(data_folder, 32)
    safety = read_adapter(safety_path, extra_architectures=(architecture_of(pipe),)).modules
    before = denoiser_state(pipe)
    result = finetune(pipe, data.images, data.captions, FinetuneConfig(mode=mode, rank=2, steps=5, batch=2),
                      safety=safety if mode == "on-top" else None)
    assert len(result.losses) == 5 and all(np.isfinite(result.losses))
    assert result.modules and set(frozen) <= set(result.modules)
    assert all((np.abs(m.up).sum() > 0) == (n not in frozen) for n, m in result.modules.items())
    assert prediction_change(pipe, result.modules) > 1e-6
    assert_denoiser_unchanged(pipe, before)
    return result


def check_first_flow_matching_loss(pipe, data_folder, sample_u, predict) -> None:
    """The first-step loss of a 1-step modular fine-tune (seed 0, batch 2) equals the loss computed by hand,
    as diffusers' DreamBooth scripts compute it: latents (mean − shift)·scale; noise, then
    u = ``sample_u(generator)`` from the same generator; σ = the training schedule's sigma at index
    ⌊u·1000⌋; x_t = (1−σ)·x0 + σ·noise; ‖``predict(pipe, x_t, t, prompts)`` − (noise − x0)‖² (the LoRA is
    zero at step 0)."""
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from auditkit.train.data import load_folder
    from auditkit.train.finetune import FinetuneConfig, finetune

    data = load_folder(data_folder, 32)
    result = finetune(pipe, data.images, data.captions, FinetuneConfig(mode="modular", rank=2, steps=1, batch=2))
    idx = np.random.default_rng(0).integers(0, len(data.images), 2)
    gen = torch.Generator().manual_seed(0)
    vae = pipe.vae
    pixels = torch.from_numpy(data.images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        x0 = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=gen)
    train = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    index = (sample_u(gen) * 1000).long()
    t, sigma = train.timesteps[index], train.sigmas[index].reshape(-1, 1, 1, 1)
    xt = (1 - sigma) * x0 + sigma * noise
    with torch.no_grad():
        pred = predict(pipe, xt, t, [data.captions[i] for i in idx])
    by_hand = float(((pred - (noise - x0)) ** 2).mean())
    assert abs(result.losses[0] - by_hand) <= 1e-5 * by_hand, (result.losses[0], by_hand)


def check_data_free(pipe, safety: dict, prediction: str, label: str, judge_tolerance: float = 1e-3) -> None:
    """The data-free checks on ``pipe`` give numbers: the concept check equals a dense reference on the
    text key/value projections' inputs captured by hand; the exact inverse of the safety adapter reverts
    all of its change to the text keys/values and to the denoiser's prediction (``prediction``: noise or
    velocity, of the ``label``), nothing reverts none, and the safety adapter itself reinforces; the base judge
    reads the exact inverse as the base and nothing as the safe model."""
    import numpy as np

    from auditkit.analysis.concept import concept_reversion, kv_reversion
    from auditkit.analysis.reversion import noise_reversion
    from auditkit.lora.adapter import LoraModule

    inverse = {n: LoraModule(n, m.down, -m.up, m.scale) for n, m in safety.items()}
    rng = np.random.default_rng(0)
    other = {n: LoraModule(n, rng.normal(size=m.down.shape).astype(np.float32),
                           rng.normal(size=m.up.shape).astype(np.float32), m.scale) for n, m in safety.items()}
    check = concept_reversion(pipe, CONCEPT_PROMPTS, "cross", other, safety)
    inputs, mask, kv = text_kv_inputs_by_hand(pipe, CONCEPT_PROMPTS, "cross", safety)
    reference = kv_reversion(inputs, mask, other, safety, kv)
    assert check.applicable and check.modules and check.concept_tokens >= 2
    assert (check.tokens, check.concept_tokens) == (reference.tokens, reference.concept_tokens)
    assert abs(check.reverted - reference.reverted) < 1e-9 and abs(check.reverted) > 1e-6
    full = concept_reversion(pipe, CONCEPT_PROMPTS, "cross", inverse, safety)
    assert abs(full.reverted - 1.0) < 1e-9 and abs(full.reverted_concept_tokens - 1.0) < 1e-9
    assert concept_reversion(pipe, CONCEPT_PROMPTS, "cross", {}, safety).reverted == 0.0
    rev = noise_reversion(pipe, CONCEPT_PROMPTS, inverse, safety, steps=3)
    assert abs(rev.reverted - 1.0) < 1e-3 and rev.relative_safety_change > 0 and len(rev.per_step) == 3
    assert (rev.prediction, rev.denoiser) == (prediction, label)
    assert noise_reversion(pipe, CONCEPT_PROMPTS, {}, safety, steps=3).reverted == 0.0
    assert noise_reversion(pipe, CONCEPT_PROMPTS, safety, safety, steps=3).reverted < 0
    # the base judge: the exact inverse draws what the base draws (1), no candidate what the safe model draws (0)
    from auditkit.analysis.base_judge import judge_updates

    neutral = [p.replace("cross", "square") for p in CONCEPT_PROMPTS]
    undone = judge_updates(pipe, CONCEPT_PROMPTS, neutral, inverse, safety, steps=2, seeds=1)
    assert abs(undone.value - 1.0) < judge_tolerance and undone.scores["safe"] != undone.scores["base"]
    assert judge_updates(pipe, CONCEPT_PROMPTS, neutral, {}, safety, steps=2, seeds=1).value == 0.0


def text_kv_inputs_by_hand(pipe, prompts, word, safety, steps=4, seed=0):
    """The dense reference of the concept check's inputs: module -> every row its text key/value projection
    reads (a UNet's cross-attention: the prompt states; an MMDiT's: its input captured at each step of the
    base model's trajectory from the same seeded noise), the concept-token mask over those rows, and the
    projections' suffixes."""
    import numpy as np
    import torch

    from auditkit.analysis.concept import concept_mask
    from auditkit.models.denoising import captured_states
    from auditkit.models.pipeline import denoiser_for, encode

    den = denoiser_for(pipe)
    cond = encode(pipe, prompts)
    mask = concept_mask(cond, word).reshape(-1)
    names = [n for n in safety if n.startswith(f"{den.component}.") and n.endswith(den.record.text_kv)]
    if den.label == "UNet":  # cross-attention keys/values read the prompt's hidden states
        hidden = cond.hidden.double().numpy().reshape(-1, cond.hidden.shape[-1])
        return {n: hidden for n in names}, mask, den.record.text_kv
    seen = {n: [] for n in names}

    def rows(inputs):
        """The captured rows at the conditioning's positions. Z-Image pads each caption itself to a multiple of 32
        (rows the image reads) and the batch to its longest (rows it does not: zeroed), so its rows are cut or
        zero-padded to the conditioning's length. HunyuanVideo 1.5 reorders its text stream (the image's, the
        glyphs' and the Qwen states' valid tokens first, then the padding of each): the Qwen rows back to their
        positions, zero where the prompt is padded."""
        if den.record.text_states is captured_states:
            return inputs.double().numpy().reshape(-1, inputs.shape[-1])
        width = cond.hidden.shape[1]
        if "encoder_attention_mask_2" in cond.added:
            return hunyuan_qwen_rows(inputs, cond).double().numpy().reshape(-1, inputs.shape[-1])
        read = (cond.added["caption_mask"].sum(dim=1) + 31) // 32 * 32
        kept = torch.zeros(inputs.shape[0], width, inputs.shape[2], dtype=inputs.dtype)
        kept[:, :min(width, inputs.shape[1])] = inputs[:, :width]
        kept *= (torch.arange(width)[None, :] < read[:, None])[..., None]
        return kept.double().numpy().reshape(-1, kept.shape[-1])

    hooks = [den.model.get_submodule(n.split(".", 1)[1]).register_forward_hook(
        lambda _m, args, _o, n=n: seen[n].append(rows(args[0]))) for n in names]
    try:
        sampler = den.sampler(steps)
        x = den.noise(len(prompts), torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for k, t in enumerate(sampler.timesteps):
                x = sampler.step(den.predict(x, t, cond), k, x)
    finally:
        for h in hooks:
            h.remove()
    return {n: np.concatenate(v) for n, v in seen.items()}, np.tile(mask, steps), den.record.text_kv


def hunyuan_qwen_rows(stream, cond):
    """The rows of HunyuanVideo 1.5's text stream (batch × tokens × d, as its double blocks read it) that hold the
    Qwen positions of ``cond``, each put back at its position (zero where the prompt is padded): the order the
    transformer's forward concatenates, rebuilt from index tensors (image tokens, all invalid in text-to-video; glyph
    tokens; Qwen tokens, tagged by their position, the others by -1)."""
    import torch

    qwen, glyphs = cond.added["encoder_attention_mask"].bool(), cond.added["encoder_attention_mask_2"].bool()
    n_image = stream.shape[1] - qwen.shape[1] - glyphs.shape[1]
    out = stream.new_zeros(qwen.shape[0], qwen.shape[1], stream.shape[2])
    for i in range(qwen.shape[0]):
        image = torch.full((n_image,), -1)
        byt5 = torch.full((glyphs.shape[1],), -1)
        positions = torch.arange(qwen.shape[1])
        order = torch.cat([byt5[glyphs[i]], positions[qwen[i]], image, byt5[~glyphs[i]], positions[~qwen[i]]])
        for row, position in enumerate(order.tolist()):
            if position >= 0 and qwen[i, position]:
                out[i, position] = stream[i, row]
    return out


def check_modular_repair(folder, pipe, safety_path, candidate: dict, data_folder, tmp_path: Path) -> dict:
    """A modular repair of ``candidate`` (retrained on the base, 3 steps) with its re-scan: the repaired
    adapter has the candidate's modules, and both scans report the data-free checks with numbers.
    Returns the repair report."""
    from auditkit.config import ScanConfig
    from auditkit.lora.adapter import read_adapter
    from auditkit.lora.write import save_adapter
    from auditkit.models.families import family_of_pipeline
    from auditkit.models.pipeline import architecture_of
    from auditkit.repair.retrain import Retraining
    from auditkit.repair.run import RepairRequest, repair
    from auditkit.suites import load_suites

    arch = architecture_of(pipe)
    cand = save_adapter(candidate, tmp_path / "cand.safetensors", arch, family_of_pipeline(pipe).written_layout)
    for name, text in (("cross", CROSS_SUITE), ("neon", NEON_SUITE)):
        (tmp_path / f"{name}.yaml").write_text(text)
    suites = [tmp_path / "cross.yaml", tmp_path / "neon.yaml"]
    config = ScanConfig(base=str(folder), suites=tuple(map(str, suites)), multipliers=(1.0,), batch_size=8,
                        device="cpu")
    request = RepairRequest(candidate=cand, safety=safety_path, out=tmp_path / "r", method="modular",
                            data=data_folder, scan=config, suites=load_suites(suites),
                            train=Retraining(steps=3, batch=2))
    report = repair(request)
    section = report["repair"]
    assert section["method"] == "modular" and section["training"]["steps"] == 3
    repaired = read_adapter(tmp_path / "r" / "pack" / "finetune.safetensors", extra_architectures=(arch,))
    assert set(repaired.modules) == set(candidate)
    assert prediction_change(pipe, repaired.modules) > 1e-6
    for side in ("before", "after"):
        assert isinstance(section[side]["concept_check"], float) and isinstance(section[side]["noise_reversion"], float)
    assert report["dynamic"]["adapter_coverage"]["candidate"]["fraction"] == 1.0
    assert "data-free" in report["evidence"]["gathered"]
    return report


def check_correction(pipe, safety_path, candidate: dict, data_folder) -> None:
    """A 3-step corrected repair (auditkit.repair.correction) on the family's denoiser: the repaired adapter is the
    candidate plus a trained correction, exactly, and the pipeline is left as it was."""
    import re

    import numpy as np

    from auditkit.lora.adapter import read_adapter
    from auditkit.models.pipeline import architecture_of
    from auditkit.repair.correction import train_correction
    from auditkit.repair.retrain import RetrainSettings
    from auditkit.train.data import load_folder

    data = load_folder(data_folder, 32)
    safety = read_adapter(safety_path, extra_architectures=(architecture_of(pipe),)).modules
    component = next(iter(candidate)).split(".", 1)[0]
    names = sorted(n.split(".", 1)[1] for n in candidate if n.startswith(component + "."))
    cfg = RetrainSettings("(" + "|".join(map(re.escape, names)) + ")", len(names), rank=2, alpha=2.0, steps=3, batch=2)
    before = denoiser_state(pipe)
    result = train_correction(pipe, data.images, data.captions, candidate, safety, ["a red cross", "a cross"], cfg)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    assert result.correction and set(result.correction) <= set(candidate)
    assert prediction_change(pipe, result.correction) > 1e-9
    for name, m in result.modules.items():
        extra = result.correction[name].delta() if name in result.correction else 0
        np.testing.assert_allclose(m.delta(), candidate[name].delta() + extra, rtol=1e-4, atol=1e-6)
    assert_denoiser_unchanged(pipe, before)
