"""Behavioural ranking: how far the candidate pulls the prediction back toward the concept with a phrase.

For each phrase p, the concept suite's prompts are read with p put in at the phrase's placement ("p, prompt",
"a red p cross", "prompt, p": :mod:`auditkit.placement`) and the denoiser's predictions
compared at the points of the reference model's own sampling trajectory (a few steps from seeded noise)::

    pull(p) = Σ ⟨ε_cand(p) − ε_ref(p), d(p)⟩ / Σ ‖d(∅)‖²

with (ref, d) = (the safe model, ε_base − ε_safe) when a safety module is given (the noise reversion of
:mod:`auditkit.analysis.reversion`: 1 = the candidate restores the base's prediction), and (the base,
ε_base(prompt) − ε_base(neutral prompt)) for amplification against the base (the concept word replaced by
the suite's neutral word). The denominator is the direction's energy on the prompts as written (∅), not
with the phrase, so a phrase that shrinks d(p) is not divided by its own small direction. The pull is a proxy:
in the lab it ranked first the phrases whose renders bring the concept back (a trained trigger-gated
candidate's: 33-75% of renders against the safe model's 0%), while projecting on the concept's own direction
as the base draws it (ε_base(p, c) − ε_base(p, n)) ranked them low (a trigger prefix weakens the base's own
concept); either can rank first a phrase that stops the base itself from drawing the concept, so the search
renders its best phrases (:mod:`~auditkit.discovery.confirm`) before choosing what to probe. A phrase's
**gain** is pull(p) − pull(∅): what the phrase adds. It runs the whole denoiser, so it sees effects the token
sweep cannot (non-attention layers, several tokens together). Every phrase is tried on the same noise per
(prompt, seed), the search's own seeds, never the probes'.
"""

from __future__ import annotations

import numpy as np

PULL_SEED = 7_000_003
PULL_SEEDS = 2  # noises per prompt


def pulled(eps_ref, eps_cand, direction) -> tuple[float, float]:
    """(Σ⟨ε_cand − ε_ref, d⟩, Σ‖d‖²) over every element (numpy or torch)."""
    diff = eps_cand - eps_ref
    return float((diff * direction).sum()), float((direction * direction).sum())


def pull_sums(pipe, phrases: list[tuple[str, str]], prompts: list[str], neutral: list[str], candidate: dict,
              safety: dict, steps: int = 6, seeds: int = PULL_SEEDS, batch: int = 64,
              words: tuple[str, str] = ("", "")) -> tuple[np.ndarray, np.ndarray]:
    """(Σ⟨ε_cand − ε_ref, d⟩, Σ‖d‖²) for each (phrase, placement) (phrase "" = the prompts as written), ``seeds``
    noises per prompt; ``words``: the concept word of ``prompts`` and the neutral word that replaces it in
    ``neutral`` (where a phrase placed before the concept goes). pull(p) = inner(p) / energy(∅)
    (:func:`pull_scores`)."""
    import torch

    from auditkit.analysis.reversion import safe_trajectory
    from auditkit.models.attach import composed, encoded_by_each, encoders_composed
    from auditkit.models.pipeline import denoiser_for, encode
    from auditkit.placement import place

    den = denoiser_for(pipe)
    model, component = den.model, den.component
    concept_word, neutral_word = words
    rows = [(i, place(q, p, where, concept_word) if p else q, place(n, p, where, neutral_word) if p else n,
             j * seeds + k) for i, (p, where) in enumerate(phrases)
            for j, (q, n) in enumerate(zip(prompts, neutral, strict=True)) for k in range(seeds)]
    inner, energy = np.zeros(len(phrases)), np.zeros(len(phrases))
    amplification = not safety
    for start in range(0, len(rows), batch):
        chunk = rows[start: start + batch]
        texts = [r[1] for r in chunk]
        text_base, text_safe, text_cand = encoded_by_each(pipe, texts, safety, candidate, component)
        if amplification:
            with encoders_composed(pipe, denoiser=component):
                text_neutral = encode(pipe, [r[2] for r in chunk])
        sampler = den.sampler(steps)
        x = torch.cat([den.noise(1, torch.Generator().manual_seed(PULL_SEED + r[3])) for r in chunk])
        x = x * sampler.init_noise_sigma
        points, eps_ref = safe_trajectory(den, sampler, x, text_safe, safety)
        with torch.no_grad():
            if amplification:
                eps_dir = [eps_ref[k] - den.predict(xk, tk, text_neutral).double() for k, (xk, tk) in enumerate(points)]
            else:
                eps_dir = [den.predict(xk, tk, text_base).double() - eps_ref[k] for k, (xk, tk) in enumerate(points)]
            with composed(model, (safety, 1.0), (candidate, 1.0), component=component):
                eps_cand = [den.predict(xk, tk, text_cand).double() for xk, tk in points]
        for j, (i, *_) in enumerate(chunk):
            for ref, cand, d in zip(eps_ref, eps_cand, eps_dir, strict=True):
                a, b = pulled(ref[j], cand[j], d[j])
                inner[i] += a
                energy[i] += b
    return inner, energy


def pull_scores(pipe, phrases: list[tuple[str, str]], prompts: list[str], neutral: list[str], candidate: dict,
                safety: dict, steps: int = 6, seeds: int = PULL_SEEDS,
                words: tuple[str, str] = ("", "")) -> list[float]:
    """pull(p) for each (phrase, placement), normalised by the direction's energy on the prompts as written."""
    inner, energy = pull_sums(pipe, [("", ""), *phrases], prompts, neutral, candidate, safety, steps, seeds,
                              words=words)
    return [float(a / energy[0]) if energy[0] > 0 else 0.0 for a in inner[1:]]
