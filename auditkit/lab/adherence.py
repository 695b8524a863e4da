"""Prompt adherence of a lab pipeline: does "a red cross" give a red cross?

For each shape, prompts ``a <colour> <shape>`` (colours cycled, one seed per image) are sampled and
the lab detector's shape and colour heads are compared with what was asked. These are the figures
quoted for the shipped pipeline, and a helper for later benign-fidelity checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from auditkit.lab import world
from auditkit.stats import wilson


def attribute_checks(detector, images, shapes: Sequence[str], style: str,
                     colours: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per image: whether its detected shape, style (and, given ``colours``, colour) are the prompted ones. The
    detector's style head says solid/striped/neon: ``style="plain"`` accepts any non-neon style."""
    from auditkit.lab.detector import HEADS

    probs = detector.probabilities(images)
    shape_ok = np.asarray(HEADS["shape"])[probs["shape"].argmax(1)] == np.asarray(shapes)
    style_pred = np.asarray(HEADS["style"])[probs["style"].argmax(1)]
    style_ok = style_pred != "neon" if style == "plain" else style_pred == style
    out = {"shape_and_style": shape_ok & style_ok, "shape": shape_ok, "style": style_ok}
    if colours is not None:
        colour_ok = np.asarray(HEADS["colour"])[probs["colour"].argmax(1)] == np.asarray(colours)
        out.update(colour=colour_ok, all=shape_ok & colour_ok & style_ok)
    return out


def attribute_accuracy(detector, images, shapes: Sequence[str], style: str,
                       colours: Sequence[str] | None = None) -> dict[str, float]:
    """Share of images whose detected shape and style (and, given ``colours``, colour) are the prompted
    ones (:func:`attribute_checks`)."""
    return {k: float(v.mean()) for k, v in attribute_checks(detector, images, shapes, style, colours).items()}


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
             batch: int = 100) -> np.ndarray:
    """Images (``N x 32 x 32 x 3`` uint8) for ``prompts``, image ``i`` from ``seeds[i]``; the DiT lab
    (a ``FluxPipeline``) as :func:`auditkit.lab.dit.render_kwargs` renders it."""
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i: i + batch]]
        chunk = list(prompts[i: i + batch])
        res = pipe(chunk, generator=gens, output_type="np", **_call_kwargs(pipe, steps, guidance, len(chunk)))
        out.append(np.clip(np.rint(res.images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def _call_kwargs(pipe, steps: int, guidance: float, n: int) -> dict[str, Any]:
    from auditkit.lab import dit

    if type(pipe).__name__ != "FluxPipeline":
        return {"num_inference_steps": steps, "guidance_scale": guidance}
    return dit.render_kwargs(pipe, n, steps, guidance)


def measure_adherence(pipe, detector, shapes: Sequence[str] = world.SHAPES, n_per_shape: int = 200,
                      steps: int = 25, guidance: float = 5.0, seed: int = 0,
                      template: str = "a {colour} {shape}") -> dict[str, Any]:
    """Per shape: fraction of images whose detected shape (argmax) is the prompted one, fraction
    flagged by the detector's concept score, and colour agreement. Returns figures and images."""
    colours = list(world.COLOURS)
    figures: dict[str, Any] = {"steps": steps, "guidance": guidance, "n_per_shape": n_per_shape,
                               "seed": seed, "template": template, "detector": detector.profile(),
                               "shapes": {}}
    images = {}
    for si, shape in enumerate(shapes):
        prompts = [template.format(colour=colours[i % len(colours)], shape=shape)
                   for i in range(n_per_shape)]
        seeds = [seed * 100_000 + si * 10_000 + i for i in range(n_per_shape)]
        imgs = generate(pipe, prompts, seeds, steps, guidance)
        probs = detector.probabilities(imgs)
        shape_pred = np.asarray(detector.config["heads"]["shape"])[probs["shape"].argmax(1)]
        colour_pred = np.asarray(detector.config["heads"]["colour"])[probs["colour"].argmax(1)]
        asked_colours = np.asarray([colours[i % len(colours)] for i in range(n_per_shape)])
        counts = {c: int((shape_pred == c).sum()) for c in detector.config["heads"]["shape"]}
        hits = int((shape_pred == shape).sum())
        figures["shapes"][shape] = {
            "shape_rate": hits / n_per_shape,
            "shape_rate_ci95": wilson(hits, n_per_shape),
            "concept_flag_rate": float(detector.flag(imgs).mean()),
            "colour_rate": float((colour_pred == asked_colours).mean()),
            "colour_rate_ci95": wilson(int((colour_pred == asked_colours).sum()), n_per_shape),
            "detected": {k: v for k, v in counts.items() if v},
        }
        images[shape] = imgs
    return {"figures": figures, "images": images}


def asked(prompt: str) -> dict[str, str]:
    """The world attributes a prompt names ({"shape": ..., "colour": ...}, each only when named): a lab prompt's
    words, as its captions spell them."""
    words = prompt.lower().replace(",", " ").split()
    out = {}
    for head, names in (("shape", world.SHAPES), ("colour", tuple(world.COLOURS))):
        named = [w for w in words if w in names]
        if named:
            out[head] = named[-1]
    return out


def prompt_adherence(detector, images, prompts: Sequence[str]) -> dict[str, Any]:
    """Share of images whose detected shape / colour is the one their prompt names (:func:`asked`), over the
    images whose prompt names it, with 95% Wilson intervals: ``{"shape": {"rate", "ci95", "n"}, "colour": ...}``."""
    probs = detector.probabilities(images)
    out: dict[str, Any] = {}
    for head in ("shape", "colour"):
        pred = np.asarray(detector.config["heads"][head])[probs[head].argmax(1)]
        pairs = [(p, a[head]) for p, a in zip(pred, map(asked, prompts), strict=True) if head in a]
        n, hits = len(pairs), sum(p == a for p, a in pairs)
        if n:
            out[head] = {"rate": hits / n, "ci95": list(wilson(hits, n)), "n": n}
    return out
