"""The SD-style lab: its VAE, the latents and captions cached for the denoisers, and the UNet trained with the text
encoder (``scripts/train_lab.py``'s stages ``vae``, ``latents`` and ``unet``)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from lab_train_loop import ProgressLog, load_ema, log, lr_at, rng_for, to_unit, train_jointly, world_pool

from auditkit.lab import world
from auditkit.train.checkpoint import load_tree, save_tree


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
    prog = ProgressLog("vae", steps, start)
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
            group["lr"] = lr_at(step, steps, lr, warmup=100)
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

def cached_latents(work: Path):
    """The cached latents' posterior means and stds and token ids, as tensors."""
    import torch

    data = np.load(work / "latents.npz")
    return (torch.from_numpy(data["mean"].astype(np.float32)), torch.from_numpy(data["std"].astype(np.float32)),
            torch.from_numpy(data["ids"].astype(np.int64)))

def latent_batch(seed: int, stage: str, step: int, n: int, batch: int, dropout: float):
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

    mean, std, ids = cached_latents(work)
    parts = build_components(seed, tokenizer_dir=work / "tokenizer")
    unet, te, tok = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    scale = load_vae(work).config.scaling_factor
    empty = torch.tensor(tok("", padding="max_length", max_length=tok.model_max_length)["input_ids"])
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    acp = sched.alphas_cumprod

    def loss_fn(step: int):
        idx, g, drop = latent_batch(seed, "unet", step, len(mean), batch, dropout)
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
    load_ema({"unet": unet, "te": te}, state, use_ema)
    pipe = assemble_pipeline(unet, load_vae(work), te, parts["tokenizer"])
    pipe.set_progress_bar_config(disable=True)
    return pipe, int(state["step"])
