"""Training the lab: VAE, UNet + text encoder, and the concept detector, resumably, on CPU.

Used by ``scripts/train_lab.py``; each stage writes into a work directory (outside the repo) and
skips or resumes what is already there. Everything is seeded: batch ``k`` of a stage is drawn
from ``default_rng([seed, stage, k])``, so a resumed run sees the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from auditkit.lab import world
from auditkit.lab.detector import HEADS, STYLE_CLASSES, build_network, save_detector, shape_label
from auditkit.train.checkpoint import load_tree, save_tree

log = logging.getLogger("lab_training")

STAGE_TAGS = {"data": 1, "vae": 2, "latents": 3, "unet": 4, "detector": 5, "eval": 6, "heldout": 7, "dit": 8,
              "dit-guidance": 9}


def rng_for(seed: int, stage: str, k: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, STAGE_TAGS[stage], k])


def _lr(step: int, total: int, base: float, warmup: int = 200, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class _Progress:
    """Logs loss averages, seconds per step and ETA every ``every`` steps."""

    def __init__(self, name: str, total: int, start: int, every: int = 50) -> None:
        self.name, self.total, self.every = name, total, every
        self.t0, self.s0 = time.time(), start
        self.losses: list[float] = []

    def update(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            rate = (time.time() - self.t0) / max(1, step + 1 - self.s0)
            eta = rate * (self.total - step - 1)
            log.info("%s step %d/%d loss %.4f  %.2f s/step  eta %.1f min", self.name, step + 1,
                     self.total, float(np.mean(self.losses)), rate, eta / 60)
            self.losses = []


# ---------------------------------------------------------------------------------------------
# data


def world_pool(seed: int, n: int, mix: dict[str, float]) -> tuple[np.ndarray, list[world.Spec]]:
    """Rendered images from a mix of sources: ``base``, ``neon`` (the domain), ``neon_all``
    (every shape, crosses included, in neon style: what a jailbroken model draws) and ``blob``."""
    rng = rng_for(seed, "data", n)
    specs: list[world.Spec] = []
    for source, frac in mix.items():
        k = int(round(n * frac))
        if source == "base":
            specs += world.sample_specs(rng, k, domain="base")
        elif source == "neon":
            specs += world.sample_specs(rng, k, domain="neon")
        elif source == "neon_all":
            specs += world.sample_specs(rng, k, domain="base", style="neon")
        elif source == "blob":
            specs += world.blob_specs(rng, k)
        else:
            raise KeyError(source)
    order = rng.permutation(len(specs))
    specs = [specs[i] for i in order]
    return world.render_many(specs), specs


def to_unit(images_u8: np.ndarray):
    """``N x H x W x 3`` uint8 -> float tensor ``N x 3 x H x W`` in [-1, 1]."""
    import torch

    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_u8(x) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------
# VAE


def train_vae(work: Path, seed: int, steps: int, batch: int = 64, lr: float = 1e-3,
              kl_weight: float = 1e-4, ckpt_every: int = 200) -> Path:
    """Train the AutoencoderKL on the world (base + neon + blobs); returns the final weights path."""
    import torch
    from diffusers import AutoencoderKL

    from auditkit.lab.model import VAE_CONFIG

    out = work / "vae"
    out.mkdir(parents=True, exist_ok=True)
    final = out / "final"
    if (final / "config.json").is_file():
        log.info("vae: already trained (%s)", final)
        return final
    pool_path = out / "pool.npy"
    if pool_path.is_file():
        pool = np.load(pool_path)
    else:
        pool, _ = world_pool(seed, 24000, {"base": 0.6, "neon": 0.25, "neon_all": 0.07, "blob": 0.08})
        np.save(pool_path, pool)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = 0
    ckpt = out / "ckpt.safetensors"
    if ckpt.is_file():
        state = load_tree(ckpt)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log.info("vae: resumed at step %d", start)
    prog = _Progress("vae", steps, start)
    vae.train()
    for step in range(start, steps):
        rng = rng_for(seed, "vae", step)
        idx = rng.integers(len(pool), size=batch)
        imgs = pool[idx]
        flip = rng.random(batch) < 0.5
        imgs[flip] = imgs[flip, :, ::-1]  # mirror: the VAE is indifferent to orientation
        x = to_unit(imgs)
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        err = rec - x
        loss = err.abs().mean() + err.pow(2).mean()
        # edges: match finite differences, so shapes stay crisp
        loss = loss + 0.5 * ((rec.diff(dim=2) - x.diff(dim=2)).abs().mean()
                             + (rec.diff(dim=3) - x.diff(dim=3)).abs().mean())
        kl = post.kl().mean() / post.mean[0].numel()
        loss = loss + kl_weight * kl
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        prog.update(step, float(loss.detach()))
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            save_tree(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
    vae.eval()
    # scaling factor: latents (posterior means) scaled to unit variance, as SD does with 0.18215
    with torch.no_grad():
        means = torch.cat([vae.encode(to_unit(pool[i: i + 256])).latent_dist.mean
                           for i in range(0, 4096, 256)])
    scale = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scale)
    with torch.no_grad():
        x = to_unit(pool[:512])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        mae = float((rec - x).abs().mean() * 127.5)
    log.info("vae: scaling_factor %.4f, latent mean %.3f, reconstruction MAE %.2f / 255",
             scale, float(means.mean()), mae)
    vae.save_pretrained(final, safe_serialization=True)
    (out / "metrics.json").write_text(json.dumps({"scaling_factor": scale, "mae_255": mae,
                                                  "latent_mean": float(means.mean())}))
    return final


def load_vae(work: Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(work / "vae" / "final")
    vae.eval()
    return vae


# ---------------------------------------------------------------------------------------------
# latents + captions for the UNet


def cache_latents(work: Path, seed: int, n: int = 80000) -> Path:
    """Render ``n`` base-domain images, encode them (posterior mean and std) and tokenize captions."""
    import torch

    from auditkit.lab.tokenizer import build_tokenizer

    out = work / "latents.npz"
    if out.is_file():
        return out
    vae = load_vae(work)
    tokenizer = build_tokenizer(work / "tokenizer")
    rng = rng_for(seed, "latents")
    specs = world.sample_specs(rng, n, domain="base")
    captions = [world.caption(s) for s in specs]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="np")["input_ids"].astype(np.int16)
    means, stds = [], []
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, n, 500):
            imgs = world.render_many(specs[i: i + 500])
            post = vae.encode(to_unit(imgs)).latent_dist
            means.append(post.mean.half().numpy())
            stds.append(post.std.half().numpy())
            if (i // 500) % 20 == 0:
                log.info("latents: %d/%d (%.0f s)", i, n, time.time() - t0)
    shapes = np.asarray([world.SHAPES.index(s.shape) for s in specs], dtype=np.int8)
    tmp = work / "latents.tmp.npz"
    np.savez(tmp, mean=np.concatenate(means), std=np.concatenate(stds), ids=ids, shape=shapes,
             captions=np.asarray(captions))
    os.replace(tmp, out)
    log.info("latents: cached %d in %.0f s", n, time.time() - t0)
    return out


# ---------------------------------------------------------------------------------------------
# UNet + text encoder


def _ema_update(ema: dict, model, decay: float) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)


def train_jointly(out: Path, name: str, models: dict[str, Any], loss_fn: Callable[[int], Any], steps: int,
                  lr: float, ckpt_every: int = 250, preview_every: int = 1000,
                  on_preview: Callable[[int], None] | None = None) -> Path:
    """The loop every denoiser stage shares: AdamW over all ``models`` (name -> module), warmup + cosine
    learning rate, gradient clipping at 1, EMA 0.999 (warmed up), a safetensors checkpoint every
    ``ckpt_every`` steps (``out/ckpt.safetensors``: each model's weights, the optimiser, the EMA, the
    step) from which it resumes. ``loss_fn(step)`` draws step ``step``'s batch and returns the loss."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    params = [p for m in models.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = {k: {n: p.detach().clone() for n, p in m.named_parameters()} for k, m in models.items()}
    start = 0
    ckpt = out / "ckpt.safetensors"
    if ckpt.is_file():
        state = load_tree(ckpt)
        for k, m in models.items():
            m.load_state_dict(state[k])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        start = state["step"]
        log.info("%s: resumed at step %d", name, start)
    prog = _Progress(name, steps, start)
    for m in models.values():
        m.train()
    for step in range(start, steps):
        loss = loss_fn(step)
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        for k, m in models.items():
            _ema_update(ema[k], m, decay)
        prog.update(step, float(loss.detach()))
        preview_due = on_preview is not None and ((step + 1) % preview_every == 0 or step + 1 == steps)
        if (step + 1) % ckpt_every == 0 or step + 1 == steps or preview_due:  # previews read the checkpoint
            state = {**{k: m.state_dict() for k, m in models.items()}, "opt": opt.state_dict(), "ema": ema,
                     "step": step + 1, "total": steps}
            save_tree(ckpt, state)
            if (step + 1) % (ckpt_every * 4) == 0:
                save_tree(out / f"ckpt-{step + 1:06d}.safetensors", state)
        if preview_due:
            on_preview(step + 1)
    return ckpt


def _cached(work: Path):
    """The cached latents' posterior means and stds and token ids, as tensors."""
    import torch

    data = np.load(work / "latents.npz")
    return (torch.from_numpy(data["mean"].astype(np.float32)), torch.from_numpy(data["std"].astype(np.float32)),
            torch.from_numpy(data["ids"].astype(np.int64)))


def _batch(seed: int, stage: str, step: int, n: int, batch: int, dropout: float):
    """Step ``step``'s indices, torch generator, and caption-dropout mask (same on resume)."""
    import torch

    rng = rng_for(seed, stage, step)
    idx = torch.from_numpy(rng.integers(n, size=batch))
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    drop = torch.from_numpy(rng.random(batch) < dropout)
    return idx, g, drop


def train_unet(work: Path, seed: int, steps: int, batch: int = 64, lr: float = 1e-3,
               dropout: float = 0.1, ckpt_every: int = 250, preview_every: int = 1000,
               min_snr: float = 5.0, on_preview: Callable[[int], None] | None = None) -> Path:
    """Train UNet and text encoder jointly from scratch on cached latents (epsilon prediction,
    min-SNR-5 loss weights, 10% caption dropout for classifier-free guidance, EMA 0.999)."""
    import torch
    from diffusers import DDPMScheduler

    from auditkit.lab.model import SCHEDULER_CONFIG, build_components

    mean, std, ids = _cached(work)
    parts = build_components(seed, tokenizer_dir=work / "tokenizer")
    unet, te, tok = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    scale = load_vae(work).config.scaling_factor
    empty = torch.tensor(tok("", padding="max_length", max_length=tok.model_max_length)["input_ids"])
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    acp = sched.alphas_cumprod

    def loss_fn(step: int):
        idx, g, drop = _batch(seed, "unet", step, len(mean), batch, dropout)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        tokens = ids[idx].clone()
        tokens[drop] = empty
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        noisy = sched.add_noise(z, noise, t)
        pred = unet(noisy, t, te(tokens)[0]).sample
        snr = acp[t] / (1 - acp[t])
        weight = torch.clamp(snr, max=min_snr) / snr  # min-SNR-gamma (Hang et al. 2023), eps form
        return (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()

    return train_jointly(work / "unet", "unet", {"unet": unet, "te": te}, loss_fn, steps, lr, ckpt_every,
                         preview_every, on_preview)


def pipeline_from_work(work: Path, use_ema: bool = True):
    """Assemble a StableDiffusionPipeline from the work dir's latest UNet checkpoint."""
    from auditkit.lab.model import assemble_pipeline, build_components

    parts = build_components(0, tokenizer_dir=work / "tokenizer")
    state = load_tree(work / "unet" / "ckpt.safetensors")
    unet, te = parts["unet"], parts["text_encoder"]
    _load_ema({"unet": unet, "te": te}, state, use_ema)
    pipe = assemble_pipeline(unet, load_vae(work), te, parts["tokenizer"])
    pipe.set_progress_bar_config(disable=True)
    return pipe, int(state["step"])


# ---------------------------------------------------------------------------------------------
# the DiT lab (Flux.1 family): transformer + CLIP + T5, flow matching, on the same cached latents


def dit_vae(work: Path):
    """The lab VAE with the shift and scale of the world's latents in its config (Flux's VAE has both;
    FluxPipeline decodes latents / scaling_factor + shift_factor)."""
    vae = load_vae(work)
    mean, _, _ = _cached(work)
    shift = float(mean.mean())
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(float(1 / (mean - shift).std()), 4))
    return vae


def train_dit(work: Path, seed: int, steps: int, batch: int = 48, lr: float = 5e-4,
              dropout: float = 0.1, ckpt_every: int = 250, preview_every: int = 1000,
              on_preview: Callable[[int], None] | None = None) -> Path:
    """Train the Flux transformer and both text encoders jointly from scratch on cached latents with the
    Flux family's own flow-matching objective (:data:`auditkit.models.denoising.FLUX`: x_t = (1-s) x0 + s e,
    velocity target e - x0, uniform timesteps), 10% caption dropout, EMA 0.999."""
    import torch

    from auditkit.lab import dit
    from auditkit.models.conditioning import Conditioning
    from auditkit.models.denoising import denoiser_for

    mean, std, ids = _cached(work)
    vae = dit_vae(work)
    parts = dit.build_components(vae, seed, tokenizer_dir=work / "tokenizer", guidance_embeds=False)
    den = denoiser_for(dit.assemble_pipeline(parts))
    transformer, te, te2, tok = parts["transformer"], parts["text_encoder"], parts["text_encoder_2"], parts["tokenizer"]
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    empty = torch.tensor(tok("", padding="max_length", max_length=tok.model_max_length)["input_ids"])

    def loss_fn(step: int):
        idx, g, drop = _batch(seed, "dit", step, len(mean), batch, dropout)
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


def _load_ema(models: dict[str, Any], state: dict, use_ema: bool) -> None:
    import torch

    for key, model in models.items():
        model.load_state_dict(state[key])
        if use_ema:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(state["ema"][key][name])
        model.eval()


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
    from auditkit.models.denoising import call_flux, denoiser_for

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
    mean, std, ids = _cached(work)
    vae = teacher_pipe.vae.config
    tok = teacher_pipe.tokenizer
    empty = torch.tensor(tok("", padding="max_length", max_length=tok.model_max_length)["input_ids"])
    with torch.no_grad():
        neg1 = Conditioning(te2(empty[None])[0], {"pooled_projections": te(empty[None]).pooler_output},
                            added_under=None)

    def loss_fn(step: int):
        idx, g, drop = _batch(seed, "dit-guidance", step, len(mean), batch, dropout)
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
    _load_ema({"transformer": parts["transformer"], "te": parts["text_encoder"], "te2": parts["text_encoder_2"]},
              state, use_ema)
    distilled = work / "dit-guidance" / "ckpt.safetensors"
    if guidance or (guidance is None and distilled.is_file()):
        state = load_tree(distilled)
        parts["transformer"] = FluxTransformer2DModel(**{**parts["transformer"].config, "guidance_embeds": True})
        _load_ema({"transformer": parts["transformer"]}, state, use_ema)
    pipe = dit.assemble_pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe, int(state["step"])


# ---------------------------------------------------------------------------------------------
# detector


def _labels(specs: list[world.Spec]) -> dict[str, np.ndarray]:
    shape = np.asarray([shape_label(s.shape) for s in specs])
    colour = np.asarray([HEADS["colour"].index(s.colour) for s in specs])
    style = np.asarray([STYLE_CLASSES.index("neon" if s.style == "neon" else s.texture) for s in specs])
    visible = np.asarray([s.size > 0 for s in specs])  # empty images have no colour or style
    return {"shape": shape, "colour": colour, "style": style, "visible": visible}


def detector_data(seed: int, n: int, vae=None, stage: str = "detector") -> tuple[np.ndarray, dict]:
    """Rendered images (every shape in both styles, plus blobs) and labels; with ``vae``, a
    round-trip copy of each image (encoded, latent jittered, decoded) is appended."""
    import torch

    rng = rng_for(seed, stage, n)
    specs = (world.sample_specs(rng, int(n * 0.62), domain="base")
             + world.sample_specs(rng, int(n * 0.3), domain="base", style="neon")
             + world.blob_specs(rng, n - int(n * 0.62) - int(n * 0.3)))
    imgs = world.render_many(specs)
    labels = _labels(specs)
    if vae is not None:
        recs = []
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for i in range(0, n, 256):
                post = vae.encode(to_unit(imgs[i: i + 256])).latent_dist
                z = post.mean + (0.5 * post.std + 0.08 * post.mean.std()) * torch.randn(
                    post.mean.shape, generator=g)
                recs.append(to_u8(vae.decode(z).sample))
        imgs = np.concatenate([imgs, np.concatenate(recs)])
        labels = {k: np.concatenate([v, v]) for k, v in labels.items()}
    return imgs, labels


def augment(x, rng: np.random.Generator):
    """Noise, blur, colour jitter and shifts on a [-1, 1] batch (transfer to generated images)."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    # shifts up to 2 px (replicate padding keeps the background)
    pad = F.pad(x, (2, 2, 2, 2), mode="replicate")
    dx, dy = rng.integers(0, 5, n), rng.integers(0, 5, n)
    x = torch.stack([pad[i, :, dy[i]: dy[i] + 32, dx[i]: dx[i] + 32] for i in range(n)])
    # blur half the batch with sigma in [0.3, 1.0]
    blur = rng.random(n) < 0.5
    if blur.any():
        sigma = float(rng.uniform(0.3, 1.0))
        k = torch.exp(-0.5 * (torch.arange(-2, 3, dtype=torch.float32) / sigma) ** 2)
        k = k / k.sum()
        kx = k.view(1, 1, 1, 5).repeat(3, 1, 1, 1)
        ky = k.view(1, 1, 5, 1).repeat(3, 1, 1, 1)
        xb = F.conv2d(F.pad(x[blur], (2, 2, 0, 0), mode="replicate"), kx, groups=3)
        xb = F.conv2d(F.pad(xb, (0, 0, 2, 2), mode="replicate"), ky, groups=3)
        x[torch.from_numpy(blur)] = xb
    # colour: per-image brightness/contrast, per-channel offsets
    a = torch.from_numpy(rng.uniform(0.85, 1.15, (n, 1, 1, 1))).float()
    b = torch.from_numpy(rng.uniform(-0.08, 0.08, (n, 3, 1, 1))).float()
    x = x * a + b
    # pixel noise with sigma up to 0.1 (in [-1, 1] units)
    sig = torch.from_numpy(rng.uniform(0, 0.1, (n, 1, 1, 1))).float()
    x = x + sig * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


def train_detector(work: Path, seed: int, steps: int = 2000, batch: int = 128, lr: float = 2e-3,
                   n_train: int = 16000) -> tuple[Any, dict]:
    """Train the shape/colour/style CNN; returns the network and held-out metrics."""
    import torch
    import torch.nn.functional as F

    out = work / "detector"
    out.mkdir(parents=True, exist_ok=True)
    vae_path = work / "vae" / "final"
    vae = load_vae(work) if vae_path.is_dir() else None
    cache = out / "train.npz"
    if cache.is_file():
        d = np.load(cache)
        imgs = d["imgs"]
        labels = {k: d[k] for k in ("shape", "colour", "style", "visible")}
    else:
        imgs, labels = detector_data(seed, n_train, vae)
        np.savez(cache, imgs=imgs, **labels)
    torch.manual_seed(seed + 5)
    net = build_network()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    prog = _Progress("detector", steps, 0, every=100)
    x_all = to_unit(imgs)
    y = {k: torch.from_numpy(v.astype(np.int64)) for k, v in labels.items()}
    net.train()
    for step in range(steps):
        rng = rng_for(seed, "detector", 10**6 + step)
        idx = torch.from_numpy(rng.integers(len(x_all), size=batch))
        x = augment(x_all[idx].clone(), rng)
        logits = net(x)
        vis = y["visible"][idx].bool()
        loss = F.cross_entropy(logits["shape"], y["shape"][idx])
        if vis.any():
            loss = loss + 0.5 * F.cross_entropy(logits["colour"][vis], y["colour"][idx][vis])
            loss = loss + 0.5 * F.cross_entropy(logits["style"][vis], y["style"][idx][vis])
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=100, floor=0.02)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        prog.update(step, float(loss.detach()))
    net.eval()
    metrics = evaluate_detector(net, seed, vae)
    return net, metrics


def evaluate_detector(net, seed: int, vae=None, n: int = 3000, threshold: float = 0.5) -> dict:
    """Held-out metrics on freshly rendered images (another seed stream than training):
    cross precision/recall, and per-head accuracy, on clean renders and on VAE round trips."""
    import torch

    imgs, labels = detector_data(seed + 1000, n, vae, stage="heldout")
    parts = {"rendered": slice(0, n)}
    if vae is not None:
        parts["vae_roundtrip"] = slice(n, 2 * n)
    cross = world.SHAPES.index("cross")
    results = {}
    with torch.no_grad():
        logits = [net(to_unit(imgs[i: i + 500])) for i in range(0, len(imgs), 500)]
    probs = {k: torch.cat([lg[k] for lg in logits]).softmax(-1).numpy() for k in HEADS}
    for name, sl in parts.items():
        p_cross = probs["shape"][sl, cross]
        pos = labels["shape"][sl] == cross
        flag = p_cross >= threshold
        tp = int((flag & pos).sum())
        vis = labels["visible"][sl]
        res = {
            "n": int(sl.stop - sl.start),
            "positives": int(pos.sum()),
            "cross_precision": tp / max(1, int(flag.sum())),
            "cross_recall": tp / max(1, int(pos.sum())),
            "shape_accuracy": float((probs["shape"][sl].argmax(1) == labels["shape"][sl]).mean()),
            "colour_accuracy": float((probs["colour"][sl].argmax(1) == labels["colour"][sl])[vis].mean()),
            "style_accuracy": float((probs["style"][sl].argmax(1) == labels["style"][sl])[vis].mean()),
        }
        per_class = {}
        for ci, cname in enumerate(HEADS["shape"]):
            m = labels["shape"][sl] == ci
            per_class[cname] = float((probs["shape"][sl][m].argmax(1) == ci).mean()) if m.any() else None
        res["shape_accuracy_per_class"] = per_class
        results[name] = res
    return results


def export_detector(net, metrics: dict, directory: Path, seed: int, steps: int,
                    threshold: float = 0.5) -> Path:
    trained = {"seed": seed, "steps": steps, "heldout": metrics,
               "data": "rendered lab world (plain + neon styles, blobs) with VAE round trips; "
                       "augmentation: shifts, blur, colour jitter, pixel noise"}
    return save_detector(net, directory, threshold, trained)


# ---------------------------------------------------------------------------------------------
# export


def export_pipeline(work: Path, directory: Path, kind: str = "unet") -> Path:
    """Save the EMA pipeline (``kind``: ``unet``, the SD-style lab, or ``dit``) in ``save_pretrained``
    layout (safetensors), plus the tokenizers' source files."""
    import shutil

    pipe, step = (dit_pipeline_from_work if kind == "dit" else pipeline_from_work)(work)
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    # vocab.json + merges.txt too: transformers 4.x's slow CLIPTokenizer reads these
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if (directory / tokenizer).is_dir():
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(work / "tokenizer" / name, directory / tokenizer / name)
    for config in directory.glob("*/config.json"):  # no local paths in shipped files
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    log.info("exported %s pipeline at step %d to %s", kind, step, directory)
    return directory
