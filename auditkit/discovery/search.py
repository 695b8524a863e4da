"""The trigger search: sweep, extend, rank behaviourally, and pick the phrases the dynamic scan probes.

:func:`find_triggers` runs the three steps of :mod:`auditkit.discovery` for one concept suite within a
:class:`Budget` and returns a :class:`Discovery`: every vocabulary swept, the phrases tried with their
scores and how each was found, and the phrases to probe (the best ``probes`` by gain; always at least the
best one, so a pass rests on rendered images of the best phrase the search found, not on its scores). Every phrase
is tried at each of the budget's placements (:mod:`auditkit.placement`: first, before the concept word, last) and
probed where it was found: a trigger trained in the middle of its captions need not answer at the start.

Example:
    >>> found = find_triggers(pipe, suite, candidate, safety)          # doctest: +SKIP
    >>> found.probed, found.to_dict()["phrases"][0]                    # doctest: +SKIP
    (['trisk'], {'text': 'trisk', 'placement': 'start', 'how': 'phrase extension', 'sweep': 3.1, 'pull': 0.62, ...})
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from auditkit.analysis.base_judge import neutral_prompts
from auditkit.discovery.pull import PULL_SEEDS
from auditkit.discovery.sweep import KVReader, token_sweep
from auditkit.discovery.tokens import sequence_tokenizers
from auditkit.placement import PLACEMENTS, START, problem

# An MMDiT's text keys/values read the text stream inside its blocks, so its sweep runs the denoiser for every
# token (a Flux.1 forward per token: hours for T5's 32k on a GPU). Unless told otherwise it sweeps the first ids
# (the most frequent pieces of a sentencepiece vocabulary), and says so (swept < vocabulary).
DENOISER_SWEEP_TOKENS = 4096


@dataclass
class Phrase:
    ids: tuple[int, ...]  # as the swept tokenizer reads it
    text: str
    score: float  # the token sweep's key/value change (single tokens; 0 for extensions)
    how: str  # "token sweep", "vocabulary sample" (a blind sweep) or "phrase extension"
    placement: str = START  # where it goes in a prompt (auditkit.placement)


@dataclass(frozen=True)
class Budget:
    """How much the search may do (the scan's ``trigger_search_*`` settings)."""

    tokens: int = 0  # tokens the data-free sweep reads per vocabulary (0: all of them)
    phrases: int = 256  # phrases tried behaviourally (a phrase at each placement counts once per placement):
    # half single tokens (the sweep's best, each at every placement), half extensions
    steps: int = 4  # denoiser steps of each behavioural trajectory
    prompts: int = 3  # concept prompts each phrase is tried on
    probes: int = 1  # phrases handed to the dynamic scan
    beam: int = 3  # phrases extended each round
    length: int = 4  # tokens in a phrase at most
    confirm: int = 8  # best phrases rendered and scored by the suite's detector
    images: int = 3  # renders per concept prompt and model for each confirmed phrase
    placements: tuple[str, ...] = tuple(PLACEMENTS)  # where phrases are put in the prompts

    def __post_init__(self):
        wrong = problem(self.placements)
        if wrong:
            raise ValueError(f"placements {wrong}, got {list(self.placements)!r}")

    @classmethod
    def of(cls, config) -> Budget:
        """The budget a :class:`~auditkit.config.ScanConfig` sets (its ``trigger_search_*`` fields)."""
        return cls(tokens=config.trigger_search_tokens, phrases=config.trigger_search_phrases,
                   steps=config.trigger_search_steps, probes=config.trigger_search_probes,
                   placements=tuple(config.trigger_search_placements))

    def split(self, vocabulary: int) -> tuple[int, int]:
        """(single tokens screened, each at every placement; tokens each beam phrase is extended with per round)."""
        places = len(self.placements)
        screen = min(vocabulary, max(1, (self.phrases + 1) // 2 // places))
        per_round = (self.phrases - screen * places) // max(self.length - 1, 1)
        return screen, max(per_round // max(self.beam, 1), 0)


@dataclass
class Discovery:
    suite: str
    sweeps: list[dict] = field(default_factory=list)  # {"tokenizer", "swept", "vocabulary", "blind", "top"}
    phrases: list[dict] = field(default_factory=list)  # {"text", "how", "sweep", "pull", "gain"}, best gain first
    baseline_pull: float = 0.0  # pull of the prompts as written
    probed: list[str] = field(default_factory=list)
    placements: list[str] = field(default_factory=list)  # where each probed phrase goes
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_swept(self) -> int:
        return sum(s["swept"] for s in self.sweeps)

    def to_dict(self) -> dict:
        return {"suite": self.suite, "sweeps": self.sweeps, "tokens_swept": self.tokens_swept,
                "phrases_tried": len(self.phrases), "phrases": self.phrases, "baseline_pull": self.baseline_pull,
                "probed": list(self.probed), "placements": list(self.placements), "seconds": round(self.seconds, 2),
                "notes": list(self.notes)}


def probes(recorded: dict) -> list[tuple[str, str]]:
    """The (phrase, placement) pairs a search recorded as probed (:meth:`Discovery.to_dict`; a report written
    before placements existed probed every phrase at the start)."""
    probed = [str(p) for p in recorded.get("probed") or []]
    where = [str(p) for p in recorded.get("placements") or []]
    return list(zip(probed, where + [START] * (len(probed) - len(where)), strict=True))


MIN_PHRASES = 12  # the fewest phrases a fitted budget tries (a few tokens at every placement)
MIN_CONFIRM = 2  # the fewest phrases a fitted budget renders (a single token and an extension)
PULL_EVALS = 3 * PULL_SEEDS  # denoiser evaluations per prompt and step of a phrase's behavioural trajectory


def fitted(budget: Budget, suite, scan_evals: int | None = None) -> Budget:
    """``budget`` fitted to ``suite`` and to the scan it precedes: no more steps than the suite renders with, no
    more prompts than it has, no more renders per prompt than its images; and, given the dynamic scan's own
    denoiser evaluations (``scan_evals``), no more phrases than cost about as many (at least
    :data:`MIN_PHRASES`) and no more rendered confirmations (at least :data:`MIN_CONFIRM`): a small suite, scanned
    in seconds, is not searched for minutes."""
    steps = min(budget.steps, suite.steps)
    prompts = min(budget.prompts, len(suite.prompts))
    images = min(budget.images, suite.images_per_prompt)
    phrases, confirm = budget.phrases, budget.confirm
    if scan_evals is not None:
        phrases = min(phrases, max(MIN_PHRASES, scan_evals // (prompts * steps * PULL_EVALS)))
        # a confirmed phrase: base, reference and candidate renders of its prompts, two evaluations a step
        confirm = min(confirm, max(MIN_CONFIRM, scan_evals // (prompts * images * suite.steps * 2 * 3)))
    return replace(budget, steps=steps, prompts=prompts, images=images, phrases=phrases, confirm=confirm)


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
    start = time.perf_counter()
    found = Discovery(suite.name)
    cand_all = candidate.exact()
    safe_all = safety.exact() if safety is not None else {}
    reader = KVReader(pipe, cand_all, safe_all)
    if reader.blind:
        found.notes.append("the candidate changes no text key/value projection and no text encoder: the token sweep "
                           "sees nothing; tokens spread over the vocabulary are tried behaviourally instead")
    prompts = spread([p.text for p in suite.prompts], budget.prompts)
    neutral = neutral_prompts(prompts, suite.concept_word, suite.neutral_word)
    trial = Trial(pipe, prompts, neutral, cand_all, safe_all, budget.steps, (suite.concept_word, suite.neutral_word))
    found.baseline_pull = trial.baseline
    for swept in sequence_tokenizers(pipe):
        limit = budget.tokens or (0 if reader.den.reads_prompt_directly else DENOISER_SWEEP_TOKENS)
        sweep = token_sweep(reader, swept, limit)
        found.sweeps.append({"tokenizer": swept, "swept": sweep.swept, "vocabulary": sweep.vocabulary,
                             "blind": sweep.blind, "baseline": sweep.baseline(),
                             "top": [{"id": t, "score": s} for t, s in sweep.ranked[:10]]})
        tokenizer = getattr(pipe, swept)
        screen, width = budget.split(sweep.swept)
        kv = dict(sweep.ranked)
        order = spread(sweep.ranked, screen) if sweep.blind else sweep.ranked[:screen]
        singles = [Phrase((t,), tokenizer.decode([t]).strip(), kv[t], "token sweep", where) for t, _ in order
                   for where in budget.placements]
        tried = trial.score(singles)
        pool = list(dict.fromkeys(p.ids[0] for p in sorted(tried, key=lambda p: -trial.gain(p))))[:width]
        beams = sorted(tried, key=lambda p: -trial.gain(p))[: budget.beam]
        for _ in range(2, budget.length + 1 if pool else 2):
            grown = [Phrase(b.ids + (t,), tokenizer.decode([*b.ids, t]).strip(), 0.0, "phrase extension", b.placement)
                     for b in beams for t in pool if t not in b.ids]
            scored = trial.score(grown)
            if not scored:
                break
            beams = sorted(scored, key=lambda p: -trial.gain(p))[: budget.beam]
    found.phrases = trial.rows()
    confirm(pipe, suite, to_render(found.phrases, budget.confirm), cand_all, safe_all, budget)
    picked = chosen(found.phrases, budget.probes)
    found.probed, found.placements = [p for p, _ in picked], [w for _, w in picked]
    if trial.unusable:
        found.notes.append(f"{trial.unusable} phrase(s) left out: their decoded text is no usable prompt word")
    found.seconds = time.perf_counter() - start
    return found


def to_render(rows: list[dict], n: int) -> list[dict]:
    """The best ``n`` phrases by gain, half of them single tokens: a long phrase can stop the base itself from
    drawing the concept, and then its probe could tell nothing (see :func:`chosen`)."""
    singles = [r for r in rows if r["how"] != "phrase extension"][: (n + 1) // 2]
    others = [r for r in rows if r not in singles]
    return sorted([*singles, *others[: n - len(singles)]], key=lambda r: -r["gain"])


def probe_of(row: dict) -> tuple[str, str]:
    """A phrase row's (phrase, placement) (rows before placements existed were tried at the start)."""
    return row["text"], row.get("placement", START)


def suppressed(row: dict) -> float:
    """How much the safety module suppresses the concept with a rendered phrase (base rate − reference rate): a
    phrase with which the base itself does not draw the concept leaves nothing to re-emerge, so its probe cannot
    tell a pass from a risk (the verdict says so: inconclusive)."""
    return row["rendered"]["base"] - row["rendered"]["reference"]


def chosen(rows: list[dict], probes: int) -> list[tuple[str, str]]:
    """The phrases the dynamic scan probes: those whose renders showed the concept back (evidence > 0) where the
    safety module suppresses it (:func:`suppressed` > 0), most evidence first, at most ``probes``; when none did,
    the one rendered phrase with which the safety module suppresses the concept most, so the probe can tell a pass
    from a risk. Each as (phrase, placement)."""
    rendered = [r for r in rows if "evidence" in r]
    shown = sorted((r for r in rendered if r["evidence"] > 0 and suppressed(r) > 0),
                   key=lambda r: (-r["evidence"], -r["gain"]))
    if shown:
        return [probe_of(r) for r in shown[:probes]]
    best = max(rendered, key=lambda r: (suppressed(r), r["gain"]), default=None)
    return [probe_of(best)] if best else [probe_of(r) for r in rows[:1]]


def confirm(pipe, suite, rows: list[dict], candidate: dict, safety: dict, budget: Budget) -> None:
    """Render ``rows``' phrases (:func:`auditkit.discovery.confirm.rendered_rates`) on the ``prompts`` the
    behavioural ranking used; each row gets ``rendered`` (the two rates) and ``evidence`` (their difference)."""
    from auditkit.discovery.confirm import rendered_rates

    if not rows:
        return
    prompts = spread(list(suite.prompts), budget.prompts)
    rates = rendered_rates(pipe, suite, [probe_of(r) for r in rows], prompts, candidate, safety, budget.images)
    for row, (base, ref, cand) in zip(rows, rates, strict=True):
        row["rendered"] = {"base": base, "reference": ref, "candidate": cand, "images": len(prompts) * budget.images}
        row["evidence"] = cand - ref


class Trial:
    """The behavioural ranking of phrases (:func:`auditkit.discovery.pull.pull_scores`), each (text, placement)
    tried once."""

    def __init__(self, pipe, prompts: list[str], neutral: list[str], candidate: dict, safety: dict, steps: int,
                 words: tuple[str, str] = ("", "")):
        from auditkit.discovery.pull import pull_sums

        self.args = (pipe, prompts, neutral, candidate, safety, steps)
        self.words = words  # (the concept word, the neutral word): where "before-concept" puts a phrase
        inner, energy = pull_sums(pipe, [("", START)], prompts, neutral, candidate, safety, steps, words=words)
        self.energy = float(energy[0])
        self.baseline = float(inner[0]) / self.energy if self.energy > 0 else 0.0
        self.pulls: dict[tuple[str, str], float] = {}
        self.phrases: dict[tuple[str, str], Phrase] = {}
        self.unusable = 0

    def _pull(self, probes: list[tuple[str, str]]) -> list[float]:
        from auditkit.discovery.pull import pull_sums

        inner, _ = pull_sums(self.args[0], probes, *self.args[1:], words=self.words)
        return [float(a) / self.energy if self.energy > 0 else 0.0 for a in inner]

    @staticmethod
    def key(p: Phrase) -> tuple[str, str]:
        return p.text.lower(), p.placement

    def score(self, phrases: list[Phrase]) -> list[Phrase]:
        """Pull the phrases not tried yet (a text at a placement once, whatever its ids); returns every usable one
        given."""
        from auditkit.analysis.triggers import clean

        usable, new = [], {}
        for p in phrases:
            text = clean(p.text)
            if text is None:
                self.unusable += 1
                continue
            p = replace(p, text=text)
            k = self.key(p)
            if k not in self.phrases:
                new.setdefault(k, p)
            usable.append(self.phrases.get(k) or new[k])
        todo = list(new.values())
        for p, q in zip(todo, self._pull([(p.text, p.placement) for p in todo]) if todo else [], strict=True):
            self.phrases[self.key(p)], self.pulls[self.key(p)] = p, q
        return usable

    def gain(self, p: Phrase) -> float:
        return self.pulls[self.key(p)] - self.baseline

    def rows(self) -> list[dict]:
        """Every (phrase, placement) tried, best gain first: {"text", "placement", "how", "sweep", "pull", "gain"}."""
        out = [{"text": p.text, "placement": p.placement, "how": p.how, "sweep": p.score, "pull": self.pulls[k],
                "gain": self.gain(p)} for k, p in self.phrases.items()]
        return sorted(out, key=lambda r: -r["gain"])
