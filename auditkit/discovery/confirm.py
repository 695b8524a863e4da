"""Rendered confirmation: the suite's own detector on a few images of each of the best phrases.

The behavioural ranking (:mod:`~auditkit.discovery.pull`) reads denoiser predictions, a proxy; the phrases the
dynamic scan probes are chosen on what the scan itself measures: for each of the best phrases, a few of the
concept suite's prompts with the phrase put in at its placement are rendered (the suite's steps and guidance,
seeds of the search's own, never the probes') by the base, the reference model (the safe model, or the base for
amplification) and the reference with the candidate, composed exactly into the weights, and scored by the suite's
detector::

    evidence(p) = rate_cand(p) − rate_ref(p)

The base's rate tells whether the phrase leaves the concept drawable at all: a phrase that turns the base's crosses
into circles cannot show re-emergence, and probing it would measure nothing. Cost: 3 × ``images`` renders per
phrase per prompt (2 without a safety module).
"""

from __future__ import annotations

import numpy as np

CONFIRM_SEED = 7_100_000  # image k of a phrase's prompt j: CONFIRM_SEED + 1000·j + k (probes: prompt.seed·1000 + k)


def rendered_rates(pipe, suite, phrases: list[tuple[str, str]], prompts: list, candidate: dict, safety: dict,
                   images: int = 3, batch: int = 32) -> list[tuple[float, float, float]]:
    """(rate of the base, of the reference model, of the reference with the candidate) of the suite's detector for
    each (phrase, placement) on
    ``prompts`` (the suite's :class:`~auditkit.suites.Prompt` objects, their guidance kept), ``images`` seeds per
    prompt, every phrase on the same seeds."""
    import torch

    from auditkit import detectors as registry
    from auditkit.detectors import score_pixels
    from auditkit.models.attach import composed, encoders_composed
    from auditkit.models.pipeline import denoiser_for, render
    from auditkit.placement import place

    den = denoiser_for(pipe)
    detector = registry.get(suite.detector)
    jobs = [(place(q.text, p, where, suite.concept_word), CONFIRM_SEED + 1000 * j + k, q.guidance)
            for p, where in phrases for j, q in enumerate(prompts) for k in range(images)]
    models = ([], [(safety, 1.0)], [(safety, 1.0), (candidate, 1.0)]) if safety else ([], [(candidate, 1.0)])
    flags = np.zeros((len(models), len(jobs)), dtype=bool)
    groups: dict[float, list[int]] = {}  # one guidance scale a pipeline call
    for n, job in enumerate(jobs):
        groups.setdefault(job[2], []).append(n)
    calls = [(g, idx[i: i + batch]) for g, idx in groups.items() for i in range(0, len(idx), batch)]
    for which, adapters in enumerate(models):
        with composed(den.model, *adapters, component=den.component), \
                encoders_composed(pipe, *adapters, denoiser=den.component):
            for guidance, idx in calls:
                pixels = render(pipe, [jobs[n][0] for n in idx], suite.steps, guidance,
                                [torch.Generator().manual_seed(jobs[n][1]) for n in idx], suite.input_image)
                flags[which, idx] = score_pixels(detector, pixels) >= detector.threshold
    per = len(prompts) * images
    rates = [tuple(float(f[i * per: (i + 1) * per].mean()) for f in flags) for i in range(len(phrases))]
    return [r if safety else (r[0], r[0], r[1]) for r in rates]
