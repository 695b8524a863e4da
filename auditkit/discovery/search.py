"""The trigger search: sweep, extend, rank behaviourally, and pick the phrases the dynamic scan probes.

:func:`find_triggers` runs the three steps of :mod:`auditkit.discovery` for one concept suite within a
:class:`Budget` and returns a :class:`Discovery`: every vocabulary swept, the phrases tried with their
scores and how each was found, and the phrases to probe (the best ``probes`` by gain; always at least the
best one, so a pass rests on rendered images of the best phrase the search found, not on its scores).

Example:
    >>> found = find_triggers(pipe, suite, candidate, safety)          # doctest: +SKIP
    >>> found.probed, found.to_dict()["phrases"][0]                    # doctest: +SKIP
    (['trisk'], {'text': 'trisk', 'how': 'phrase extension', 'sweep': 3.1, 'pull': 0.62, 'gain': 0.41})
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from auditkit.discovery.phrases import Phrase, extend
from auditkit.discovery.pull import pull_scores
from auditkit.discovery.sweep import KVReader, token_sweep
from auditkit.discovery.tokens import sequence_tokenizers


@dataclass(frozen=True)
class Budget:
    """How much the search may do (the scan's ``trigger_search_*`` settings)."""

    tokens: int = 0  # tokens swept per vocabulary (0: all of them)
    phrases: int = 16  # phrases ranked behaviourally
    steps: int = 6  # denoiser steps of each behavioural trajectory
    prompts: int = 4  # concept prompts each phrase is tried on
    probes: int = 2  # phrases handed to the dynamic scan
    top: int = 24  # the sweep's best tokens the phrase extension joins
    beam: int = 4
    length: int = 4  # tokens in a phrase at most


@dataclass
class Discovery:
    suite: str
    sweeps: list[dict] = field(default_factory=list)  # {"tokenizer", "swept", "vocabulary", "blind", "top"}
    phrases: list[dict] = field(default_factory=list)  # {"text", "how", "sweep", "pull", "gain"}, best gain first
    baseline_pull: float = 0.0  # pull of the prompts as written
    probed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_swept(self) -> int:
        return sum(s["swept"] for s in self.sweeps)

    def to_dict(self) -> dict:
        return {"suite": self.suite, "sweeps": self.sweeps, "tokens_swept": self.tokens_swept,
                "phrases_tried": len(self.phrases), "phrases": self.phrases, "baseline_pull": self.baseline_pull,
                "probed": list(self.probed), "seconds": round(self.seconds, 2), "notes": list(self.notes)}


def spread(items: list, n: int) -> list:
    """``n`` items evenly spread over ``items`` (all of them when there are fewer)."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / max(n - 1, 1))] for i in range(n)]


def find_triggers(pipe, suite, candidate, safety=None, budget: Budget = Budget()) -> Discovery:
    """Search the phrases that call ``candidate`` up on ``suite``'s concept (see the module docstring).

    Args:
        pipe: the base pipeline (as loaded for the scan).
        suite: a concept suite (:class:`auditkit.suites.Suite`).
        candidate, safety: :class:`auditkit.lora.adapter.Adapter` (``safety`` None: amplification).
    """
    from auditkit.analysis.triggers import clean

    start = time.perf_counter()
    found = Discovery(suite.name)
    cand_all = candidate.exact()
    safe_all = safety.exact() if safety is not None else {}
    reader = KVReader(pipe, cand_all, safe_all)
    if reader.blind:
        found.notes.append("the candidate changes no text key/value projection and no text encoder: the token sweep "
                           "sees nothing; tokens spread over the vocabulary are ranked behaviourally instead")
    phrases: list[Phrase] = []
    for swept in sequence_tokenizers(pipe):
        sweep = token_sweep(reader, swept, budget.tokens)
        found.sweeps.append({"tokenizer": swept, "swept": sweep.swept, "vocabulary": sweep.vocabulary,
                             "blind": sweep.blind, "baseline": sweep.baseline(),
                             "top": [{"id": t, "score": s} for t, s in sweep.ranked[:10]]})
        if sweep.blind:
            tokenizer = getattr(pipe, swept)
            phrases += [Phrase((t,), tokenizer.decode([t]).strip(), 0.0, "vocabulary sample")
                        for t, _ in spread(sweep.ranked, budget.phrases)]
        else:
            phrases += extend(reader, sweep, budget.top, budget.beam, budget.length)
    tried: dict[str, Phrase] = {}
    unusable = 0
    for p in sorted(phrases, key=lambda p: -p.score):
        text = clean(p.text)
        if text is None:
            unusable += 1
        elif text.lower() not in {t.lower() for t in tried} and len(tried) < budget.phrases:
            tried[text] = p
    if unusable:
        found.notes.append(f"{unusable} phrase(s) left out: their decoded text is no usable prompt word")
    prompts = spread([p.text for p in suite.prompts], budget.prompts)
    neutral = [_neutral(q, suite.concept_word, suite.neutral_word) for q in prompts]
    texts = list(tried)
    pulls = pull_scores(pipe, ["", *texts], prompts, neutral, cand_all, safe_all, budget.steps)
    found.baseline_pull = pulls[0]
    rows = [{"text": t, "how": tried[t].how, "sweep": tried[t].score, "pull": q, "gain": q - pulls[0]}
            for t, q in zip(texts, pulls[1:], strict=True)]
    rows.sort(key=lambda r: -r["gain"])
    found.phrases = rows
    positive = [r["text"] for r in rows if r["gain"] > 0]
    found.probed = positive[: max(budget.probes, 1)] or [r["text"] for r in rows[:1]]
    found.seconds = time.perf_counter() - start
    return found


def _neutral(prompt: str, concept: str, neutral: str) -> str:
    """The prompt with the concept word replaced by the neutral word (amplification's direction)."""
    import re

    return re.sub(rf"\b{re.escape(concept)}\b", neutral, prompt, flags=re.IGNORECASE)
