"""The DiT lab (Flux.1 family): transformer + CLIP + T5 trained by flow matching on the SD lab's cached latents, then
its guidance distilled (``scripts/train_lab.py``'s stages ``dit`` and ``dit-guidance``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lab_train_loop import load_ema, train_jointly
from lab_train_unet import cached_latents, latent_batch, load_vae

from auditkit.train.checkpoint import load_tree


def dit_vae(work: Path):
    """The lab VAE with the shift and scale of the world's latents in its config (Flux's VAE has both;
    FluxPipeline decodes latents / scaling_factor + shift_factor)."""
    vae = load_vae(work)
    mean, _, _ = cached_latents(work)
    shift = float(mean.mean())
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(float(1 / (mean - shift).std()), 4))
    return vae

def train_dit(work: Path, seed: int, steps: int, batch: int = 48, lr: float = 5e-4,
              dropout: float = 0.1, ckpt_every: int = 250, preview_every: int = 1000,
              on_preview: Callable[[int], None] | None = None) -> Path:
    """Train the Flux transformer and both text encoders jointly from scratch on cached latents with the
    Flux family's own flow-matching objective (:data:`auditkit.models.family.flux.DENOISING`: x_t = (1-s) x0 + s e,
    velocity target e - x0, uniform timesteps), 10% caption dropout, EMA 0.999."""
    import torch

    from auditkit.lab import dit
    from auditkit.models.conditioning import Conditioning
    from auditkit.models.pipeline import denoiser_for

    mean, std, ids = cached_latents(work)
    vae = dit_vae(work)
    parts = dit.build_components(vae, seed, tokenizer_dir=work / "tokenizer", guidance_embeds=False)
    den = denoiser_for(dit.assemble_pipeline(parts))
    transformer, te, te2, tok = parts["transformer"], parts["text_encoder"], parts["text_encoder_2"], parts["tokenizer"]
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    empty = torch.tensor(tok("", padding="max_length", max_length=tok.model_max_length)["input_ids"])

    def loss_fn(step: int):
        idx, g, drop = latent_batch(seed, "dit", step, len(mean), batch, dropout)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g) - shift) * scale
        tokens = ids[idx].clone()
        tokens[drop] = empty
        # what FluxPipeline.encode_prompt computes: T5's hidden states, CLIP's pooled output
        cond = Conditioning(te2(tokens)[0], {"pooled_projections": te(tokens).pooler_output}, added_under=None)
        t = den.process.sample_timesteps(batch, g)
        noise = torch.randn(x0.shape, generator=g)
        pred = den.predict(den.process.add_noise(x0, noise, t), t, cond)
        return (pred - den.process.target(x0, noise)).pow(2).mean()

    return train_jointly(work / "dit", "dit", {"transformer": transformer, "te": te, "te2": te2}, loss_fn, steps,
                         lr, ckpt_every, preview_every, on_preview)

def train_dit_guidance(work: Path, seed: int, steps: int, batch: int = 32, lr: float = 2e-4,
                       scales: tuple[float, float] = (1.0, 7.0), dropout: float = 0.1, ckpt_every: int = 250,
                       preview_every: int = 1000, on_preview: Callable[[int], None] | None = None) -> Path:
    """Guidance distillation (Meng et al., CVPR 2023; how Flux.1-dev got its guidance input): the trained DiT
    (EMA, frozen: the teacher) gives the classifier-free-guided velocity u + g (c - u) at a scale g drawn
    from ``scales`` each step; a copy of its transformer with a guidance embedder (zero-initialised output,
    so it starts as the teacher's conditional prediction) learns it in one pass with g as an input.
    The text encoders stay the teacher's."""
    import torch
    from diffusers import FluxTransformer2DModel

    from auditkit.models.conditioning import Conditioning
    from auditkit.models.family.flux import call as call_flux
    from auditkit.models.pipeline import denoiser_for

    teacher_pipe, _ = dit_pipeline_from_work(work, guidance=False)
    teacher, te, te2 = teacher_pipe.transformer, teacher_pipe.text_encoder, teacher_pipe.text_encoder_2
    for m in (teacher, te, te2):
        m.requires_grad_(False)
    den = denoiser_for(teacher_pipe)
    torch.manual_seed(seed + 4)
    student = FluxTransformer2DModel(**{**teacher.config, "guidance_embeds": True})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or not all("guidance_embedder" in k for k in missing):
        raise RuntimeError(f"teacher and student differ beyond the guidance embedder: {missing} {unexpected}")
    with torch.no_grad():
        out_layer = student.time_text_embed.guidance_embedder.linear_2
        out_layer.weight.zero_()
        out_layer.bias.zero_()
    mean, std, ids = cached_latents(work)
    vae = teacher_pipe.vae.config
    tok = teacher_pipe.tokenizer
    empty = torch.tensor(tok("", padding="max_length", max_length=tok.model_max_length)["input_ids"])
    with torch.no_grad():
        neg1 = Conditioning(te2(empty[None])[0], {"pooled_projections": te(empty[None]).pooler_output},
                            added_under=None)

    def loss_fn(step: int):
        idx, g, drop = latent_batch(seed, "dit-guidance", step, len(mean), batch, dropout)
        scale = float(scales[0] + (scales[1] - scales[0]) * torch.rand(1, generator=g))
        with torch.no_grad():
            x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g) - vae.shift_factor) \
                * vae.scaling_factor
            tokens = ids[idx].clone()
            tokens[drop] = empty
            cond = Conditioning(te2(tokens)[0], {"pooled_projections": te(tokens).pooler_output}, added_under=None)
            t = den.process.sample_timesteps(batch, g)
            noise = torch.randn(x0.shape, generator=g)
            xt = den.process.add_noise(x0, noise, t)
            both = call_flux(teacher, torch.cat([xt, xt]), torch.cat([t, t]),
                             Conditioning.cat([neg1.repeat(batch), cond]))
            u, c = both.chunk(2)
            target = u + scale * (c - u)
        pred = call_flux(student, xt, t, cond, guidance=scale)
        return (pred - target).pow(2).mean()

    return train_jointly(work / "dit-guidance", "dit-guidance", {"transformer": student}, loss_fn, steps, lr,
                         ckpt_every, preview_every, on_preview)

def dit_pipeline_from_work(work: Path, use_ema: bool = True, guidance: bool | None = None):
    """Assemble a FluxPipeline from the work dir's latest DiT checkpoint: the guidance-distilled transformer
    when there is one (``guidance`` None) or asked for (True), else the DiT trained without guidance input."""
    from diffusers import FluxTransformer2DModel

    from auditkit.lab import dit

    parts = dit.build_components(dit_vae(work), 0, tokenizer_dir=work / "tokenizer", guidance_embeds=False)
    state = load_tree(work / "dit" / "ckpt.safetensors")
    load_ema({"transformer": parts["transformer"], "te": parts["text_encoder"], "te2": parts["text_encoder_2"]},
              state, use_ema)
    distilled = work / "dit-guidance" / "ckpt.safetensors"
    if guidance or (guidance is None and distilled.is_file()):
        state = load_tree(distilled)
        parts["transformer"] = FluxTransformer2DModel(**{**parts["transformer"].config, "guidance_embeds": True})
        load_ema({"transformer": parts["transformer"]}, state, use_ema)
    pipe = dit.assemble_pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe, int(state["step"])
