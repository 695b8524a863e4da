"""Behavioural ranking: how far the candidate pulls the prediction back toward the concept with a phrase.

For each phrase p, the concept suite's prompts are read as "p, prompt" and the denoiser's predictions
compared at the points of the reference model's own sampling trajectory (a few steps from seeded noise)::

    pull(p) = Σ ⟨ε_cand(p, c) − ε_ref(p, c), d(p)⟩ / Σ ‖d(∅)‖²,   d(p) = ε_base(p, c) − ε_base(p, n)

with ref the safe model (the base for amplification against the base), c the concept prompt and n the same
prompt with the concept word replaced by the suite's neutral word ("a red cross" / "a red square"). d is the
concept's own direction as the base draws it with the phrase: how far the candidate moves the safe model's
prediction toward drawing the concept rather than its neutral twin (1: the whole way, as the base does). A
direction of the concept, not "toward the base": a candidate that repairs what the safety module damaged
elsewhere (colours, other shapes) moves toward the base without drawing the concept, and a phrase that stops
the base itself from drawing the concept shrinks d(p) and scores little; the denominator is the direction's
energy on the prompts as written (∅), so such a phrase is not divided by its own small direction. A phrase's
**gain** is pull(p) − pull(∅): what the phrase adds. It runs the whole denoiser, so it sees effects the token
sweep cannot (non-attention layers, several tokens together). Every phrase is tried on the same noise per
(prompt, seed), the search's own seeds, never the probes'.
"""

from __future__ import annotations

import numpy as np

PULL_SEED = 7_000_003


def pulled(eps_ref, eps_cand, direction) -> tuple[float, float]:
    """(Σ⟨ε_cand − ε_ref, d⟩, Σ‖d‖²) over every element (numpy or torch)."""
    diff = eps_cand - eps_ref
    return float((diff * direction).sum()), float((direction * direction).sum())


def pull_sums(pipe, phrases: list[str], prompts: list[str], neutral: list[str], candidate: dict, safety: dict,
              steps: int = 6, seeds: int = 2, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(Σ⟨ε_cand − ε_ref, d⟩, Σ‖d‖²) for each phrase ("" = the prompts as written), ``seeds`` noises per prompt;
    pull(p) = inner(p) / energy(∅) (:func:`pull_scores`)."""
    import torch

    from auditkit.models.conditioning import encode
    from auditkit.models.denoising import denoiser_for
    from auditkit.train.lora import composed, encoded_by_each

    den = denoiser_for(pipe)
    model, component = den.model, den.component
    rows = [(i, f"{p}, {q}" if p else q, f"{p}, {n}" if p else n, j * seeds + k) for i, p in enumerate(phrases)
            for j, (q, n) in enumerate(zip(prompts, neutral, strict=True)) for k in range(seeds)]
    inner, energy = np.zeros(len(phrases)), np.zeros(len(phrases))
    for start in range(0, len(rows), batch):
        chunk = rows[start: start + batch]
        text_c, text_safe, text_cand = encoded_by_each(pipe, [r[1] for r in chunk], safety, candidate, component)
        text_n = encode(pipe, [r[2] for r in chunk])
        sampler = den.sampler(steps)
        x = torch.cat([den.noise(1, torch.Generator().manual_seed(PULL_SEED + r[3])) for r in chunk])
        x = x * sampler.init_noise_sigma
        points, eps_ref = [], []
        with torch.no_grad(), composed(model, (safety, 1.0), component=component):
            for k, t in enumerate(sampler.timesteps):
                tt = t.to(model.device) if hasattr(t, "to") else t
                points.append((x, tt))
                eps = den.predict(x, tt, text_safe)
                eps_ref.append(eps.double())
                x = sampler.step(eps, k, x)
        with torch.no_grad():
            eps_dir = [(den.predict(xk, tk, text_c) - den.predict(xk, tk, text_n)).double() for xk, tk in points]
            with composed(model, (safety, 1.0), (candidate, 1.0), component=component):
                eps_cand = [den.predict(xk, tk, text_cand).double() for xk, tk in points]
        for j, (i, *_) in enumerate(chunk):
            for ref, cand, d in zip(eps_ref, eps_cand, eps_dir, strict=True):
                a, b = pulled(ref[j], cand[j], d[j])
                inner[i] += a
                energy[i] += b
    return inner, energy


def pull_scores(pipe, phrases: list[str], prompts: list[str], neutral: list[str], candidate: dict, safety: dict,
                steps: int = 6, seeds: int = 2) -> list[float]:
    """pull(p) for each phrase, normalised by the direction's energy on the prompts as written."""
    inner, energy = pull_sums(pipe, ["", *phrases], prompts, neutral, candidate, safety, steps, seeds)
    return [float(a / energy[0]) if energy[0] > 0 else 0.0 for a in inner[1:]]
