"""The methods of ``auditkit align`` (a registry: one record per method), their preservation anchors, and what a
trained safety module costs on those anchors.

* ``esd-x`` / ``esd-u``: ESD (:mod:`auditkit.train.esd`) on the method's layers; with anchors, the preservation
  term pins the anchors' predictions to the frozen base's (weight ``preserve``).
* ``uce``: the closed-form edit of the layers that read the prompt's encoding, with the anchors as preserved
  concepts (:mod:`auditkit.train.uce`); each concept prompt's guide is the prompt with the anchor suite's concept
  word swapped for its neutral word ("a red cross" -> "a red square"), so it needs anchors.

Anchors come from suite files (as ``auditkit repair --anchors`` takes them) and must share no prompt with the
concept prompts: a prompt cannot be erased and pinned at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditkit.errors import BadInput


@dataclass(frozen=True)
class AlignAnchors:
    suites: tuple  # auditkit.suites.Suite
    prompts: tuple[str, ...]

    @property
    def word(self) -> tuple[str, str]:
        """The concept word and its neutral word, as the (first) anchor suite declares them."""
        return self.suites[0].concept_word, self.suites[0].neutral_word


def read_anchors(files: Sequence[Path], concept_prompts: Sequence[str]) -> AlignAnchors | None:
    """The anchor suites' prompts; BadInput naming the file when one cannot be read or shares a prompt with
    the concept prompts. None without files."""
    from auditkit.suites import load_suites, normalised

    if not files:
        return None
    suites = load_suites(files)
    concept = {normalised(p) for p in concept_prompts}
    for s in suites:
        shared = [p.text for p in s.prompts if normalised(p.text) in concept]
        if shared:
            raise BadInput(s.path or None, f"{len(shared)} of its prompts are also concept prompts (e.g. "
                                           f"{shared[0]!r}): an anchor is kept as the base draws it, so it cannot "
                                           f"be erased too")
    return AlignAnchors(tuple(suites), tuple(dict.fromkeys(p.text for s in suites for p in s.prompts)))


def guide_prompts(concept_prompts: Sequence[str], anchors: AlignAnchors) -> list[str]:
    """Each concept prompt with the anchor suite's concept word swapped for its neutral word (whole words);
    BadInput naming the suite when a prompt does not contain the word."""
    word, neutral = anchors.word
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
    out = []
    for p in concept_prompts:
        if not pattern.search(p):
            raise BadInput(anchors.suites[0].path or None, f"uce: the concept prompt {p!r} does not contain the "
                                                           f"suite's concept word {word!r} (its guide would be "
                                                           f"itself)")
        out.append(pattern.sub(neutral, p))
    return out


@dataclass(frozen=True)
class AlignMethod:
    name: str
    summary: str
    train: Callable[..., Any]  # (pipe, concept_prompts, anchors | None, settings, progress) -> modules
    check: Callable[[dict, bool], Any]  # (settings, with anchors): BadInput for a bad setting, before any model
    full: Callable[..., Any] | None = None  # the same as the erased model's exact update (--full), if offered
    needs_anchors: bool = False


def _esd_config(method: str, settings: dict, anchored: bool):
    from auditkit.train.esd import ESDConfig

    preserve = settings.get("preserve")
    preserve = (1.0 if preserve is None else preserve) if anchored else 0.0
    keys = ("rank", "alpha", "steps", "lr", "batch", "eta", "seed", "ddim_steps")
    return ESDConfig(method=method, preserve=preserve, **{k: settings[k] for k in keys if k in settings})


def _esd(method: str, full: bool):
    def run(pipe, concept_prompts, anchors, settings, progress=None):
        from auditkit.train.esd import train_esd, train_esd_full

        train = train_esd_full if full else train_esd
        return train(pipe, concept_prompts, _esd_config(method, settings, anchors is not None), progress,
                     anchor_prompts=anchors.prompts if anchors is not None else ())

    return run


def _uce_config(settings: dict, anchored: bool = True):
    from auditkit.train.uce import UCEConfig

    preserve = settings.get("preserve")
    return UCEConfig(preserve=1.0 if preserve is None else preserve)


def _uce(pipe, concept_prompts, anchors, settings, progress=None):
    from auditkit.train.uce import train_uce

    if anchors is None:
        raise BadInput(None, "uce needs --anchors (the preserved prompts, and the concept word's neutral word)")
    modules = train_uce(pipe, concept_prompts, guide_prompts(concept_prompts, anchors), anchors.prompts,
                        _uce_config(settings))
    if progress:
        progress(1, 1, 0.0)
    return modules


ALIGN_METHODS: dict[str, AlignMethod] = {m.name: m for m in (
    AlignMethod("esd-x", "ESD on cross-attention (concept-specific; SD3/Flux: joint attention's text projections)",
                _esd("esd-x", False), lambda s, a: _esd_config("esd-x", s, a), _esd("esd-x", True)),
    AlignMethod("esd-u", "ESD on the other transformer layers (global)", _esd("esd-u", False),
                lambda s, a: _esd_config("esd-u", s, a), _esd("esd-u", True)),
    AlignMethod("uce", "closed-form edit of the layers reading the prompt (UCE), anchors preserved; no training",
                _uce, _uce_config, needs_anchors=True),
)}


def anchor_cost(pipe, modules, anchors: AlignAnchors, detector, batch: int = 64) -> dict:
    """Prompt adherence (:func:`auditkit.lab.adherence.prompt_adherence`) of the base and of base + ``modules``
    on the anchor suites' images (their own seeds, guidance and steps: the scan's jobs), judged by ``detector``."""
    import numpy as np

    from auditkit.lab.adherence import prompt_adherence
    from auditkit.models.attach import composed
    from auditkit.models.pipeline import denoiser_for
    from auditkit.runner import plan

    jobs = plan(list(anchors.suites))
    den = denoiser_for(pipe)

    def render() -> np.ndarray:
        from auditkit.lab.adherence import generate

        out = []
        for key in sorted({(j.steps, j.guidance) for j in jobs}):
            group = [j for j in jobs if (j.steps, j.guidance) == key]
            out.append((group, generate(pipe, [j.prompt for j in group], [j.seed for j in group], key[0], key[1],
                                        batch)))
        prompts = [j.prompt for group, _ in out for j in group]
        return prompts, np.concatenate([imgs for _, imgs in out])

    prompts, base = render()
    with composed(den.model, (modules, 1.0), component=den.component):
        _, aligned = render()
    return {"images": len(prompts), "base": prompt_adherence(detector, base, prompts),
            "base+safety": prompt_adherence(detector, aligned, prompts)}
