"""The lab's concept detector: its labelled data, augmentation, training, held-out evaluation and export
(``scripts/train_lab.py``'s stage ``detector``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from lab_train_loop import ProgressLog, lr_at, rng_for, to_u8, to_unit
from lab_train_unet import load_vae

from auditkit.lab import world
from auditkit.lab.detector import HEADS, STYLE_CLASSES, build_network, save_detector, shape_label


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
    prog = ProgressLog("detector", steps, 0, every=100)
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
            group["lr"] = lr_at(step, steps, lr, warmup=100, floor=0.02)
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
