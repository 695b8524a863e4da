"""The lab's training machinery: seeded batches, the learning-rate schedule, the progress log, EMA weights, the
joint training loop with its checkpoints, and the rendered images it trains on.

Used by ``scripts/train_lab.py`` (through ``lab_train_unet``, ``lab_train_dit`` and ``lab_train_detector``); each
stage writes into a work directory (outside the repo) and skips or resumes what is already there. Everything is
seeded: batch ``k`` of a stage is drawn from ``default_rng([seed, stage, k])``, so a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from auditkit.lab import world
from auditkit.train.checkpoint import load_tree, save_tree

log = logging.getLogger("lab_training")

STAGE_TAGS = {"data": 1, "vae": 2, "latents": 3, "unet": 4, "detector": 5, "eval": 6, "heldout": 7, "dit": 8,
              "dit-guidance": 9}


def rng_for(seed: int, stage: str, k: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, STAGE_TAGS[stage], k])

def lr_at(step: int, total: int, base: float, warmup: int = 200, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

class ProgressLog:
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

def ema_update(ema: dict, model, decay: float) -> None:
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
    prog = ProgressLog(name, steps, start)
    for m in models.values():
        m.train()
    for step in range(start, steps):
        loss = loss_fn(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        for k, m in models.items():
            ema_update(ema[k], m, decay)
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

def load_ema(models: dict[str, Any], state: dict, use_ema: bool) -> None:
    import torch

    for key, model in models.items():
        model.load_state_dict(state[key])
        if use_ema:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(state["ema"][key][name])
        model.eval()
