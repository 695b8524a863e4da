"""Phrase extension: join the sweep's top tokens into the sequences the candidate reacts to most.

A made-up trigger word is several tokens ("trisk" is ``tri s k</w>`` in the lab, "ohwx" ``oh wx</w>`` in
CLIP), and a trigger phrase several words. A beam search over sequences of the sweep's best tokens, each
sequence read in order after the start token (:class:`~auditkit.discovery.sweep.KVReader`), scores a
sequence by what its positions change above an ordinary token::

    score(t_1..t_n) = Σ_i (change_i / energy_i − baseline)

(baseline: the sweep's median token score), so a token the candidate does not react to adds nothing and
one it was trained on adds its whole change. Data-free: text encoder and key/value projections only.
"""

from __future__ import annotations

from dataclasses import dataclass

from auditkit.discovery.sweep import KVReader, Sweep


@dataclass
class Phrase:
    ids: tuple[int, ...]
    text: str
    score: float  # Σ over its positions of the relative key/value change above the baseline
    how: str  # "token sweep" (one token) or "phrase extension"


def phrase_score(per_position, baseline: float) -> float:
    """Σ_i (r_i − baseline) over a sequence's positions (r_i: each position's relative change)."""
    return float(sum(r - baseline for r in per_position))


def extend(reader: KVReader, sweep: Sweep, top: int = 24, beam: int = 4, length: int = 4) -> list[Phrase]:
    """Every single token of the sweep's ``top`` and the beam's sequences up to ``length`` tokens, best first
    (texts as the tokenizer decodes the ids)."""
    tokenizer = getattr(reader.pipe, sweep.tokenizer)
    base = sweep.baseline()
    pool = [t for t, _ in sweep.ranked[:top]]
    out = [Phrase((t,), tokenizer.decode([t]).strip(), s - base, "token sweep") for t, s in sweep.ranked[:top]]
    if reader.blind:
        return out
    beams = [p.ids for p in out[:beam]]
    for _ in range(2, length + 1):
        grown = [b + (t,) for b in beams for t in pool if t not in b]
        if not grown:
            break
        placeholders = {f"\x00auditkit-phrase-{i}": list(ids) for i, ids in enumerate(grown)}
        rows = reader.read(list(placeholders), [list(g) for g in grown], sweep.tokenizer, placeholders)
        scored = [Phrase(ids, tokenizer.decode(list(ids)).strip(), phrase_score(r.per_position, base),
                         "phrase extension") for ids, r in zip(grown, rows, strict=True)]
        scored.sort(key=lambda p: -p.score)
        out += scored[:beam]
        beams = [p.ids for p in scored[:beam]]
    out.sort(key=lambda p: -p.score)
    return out
