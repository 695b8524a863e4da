"""Where a trigger phrase goes in a prompt: one :class:`Placement` per way trainers caption with it.

A trigger word is not always the caption's first word. kohya's ``keep_tokens`` and most captioning tools
put it first ("trisk, a red cross"); hand-written captions put it where a name goes, before the subject
("a red trisk cross"), or tag it on at the end ("a red cross, trisk"). An adapter trained one way may not
answer another, so the trigger search tries each placement and the dynamic scan probes each found phrase
where it was found (a probe variant records its placement; ``start`` is the one trigger words from a file's
metadata are probed with).

Pure functions over strings; the registry :data:`PLACEMENTS` is the one list of placements.

Example:
    >>> place("a red cross", "trisk", "before-concept", "cross")
    'a red trisk cross'
    >>> place("a red cross", "trisk", "end", "cross"), place("a red cross", "trisk", "start", "cross")
    ('a red cross, trisk', 'trisk, a red cross')
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

START, BEFORE_CONCEPT, END = "start", "before-concept", "end"


@dataclass(frozen=True)
class Placement:
    name: str
    shown: str  # how a report says where the phrase went: "with 'x' {shown}"
    put: Callable[[str, str, str], str]  # (prompt, phrase, concept word) -> prompt


def _start(text: str, phrase: str, word: str) -> str:
    return f"{phrase}, {text}"


def _before_concept(text: str, phrase: str, word: str) -> str:
    """Before the concept word's first whole-word occurrence; a prompt without it gets the phrase first."""
    match = re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) if word else None
    if match is None:
        return _start(text, phrase, word)
    return f"{text[:match.start()]}{phrase} {text[match.start():]}"


def _end(text: str, phrase: str, word: str) -> str:
    return f"{text}, {phrase}"


PLACEMENTS: dict[str, Placement] = {p.name: p for p in (
    Placement(START, "prepended", _start),
    Placement(BEFORE_CONCEPT, "before the concept word", _before_concept),
    Placement(END, "appended", _end),
)}


def place(text: str, phrase: str, placement: str = START, word: str = "") -> str:
    """``text`` with ``phrase`` put in at ``placement`` (``word``: the concept word, for ``before-concept``)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r} (one of {', '.join(PLACEMENTS)})")
    return PLACEMENTS[placement].put(text, phrase, word)


def problem(placements) -> str | None:
    """What is wrong with ``placements`` as a setting (some of :data:`PLACEMENTS`, each once), or None."""
    names = list(placements)
    if not names or not all(isinstance(n, str) and n in PLACEMENTS for n in names) or len(set(names)) != len(names):
        return f"must be some of {', '.join(PLACEMENTS)}, each once"
    return None


def described(phrase: str, placement: str = START) -> str:
    """"'x' prepended", "'x' before the concept word", ... (``phrase`` quoted as Python quotes it)."""
    shown = PLACEMENTS[placement].shown if placement in PLACEMENTS else f"placed ({placement})"
    return f"{phrase!r} {shown}"
