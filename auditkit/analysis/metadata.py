"""Metadata evidence: training-caption tags and trigger words that name a suite's concept.

kohya's ``ss_tag_frequency`` (dataset -> tag -> count) lists the tags of the training captions, and
trigger words (``modelspec.trigger_phrase``, a sidecar's ``trainedWords``, ``--trigger``; see
:mod:`auditkit.analysis.triggers`) the words a user is told to prompt with. A tag such as "nude" in an
adapter audited against the nudity suite says the adapter was trained on that concept; so does a tag that
is the concept word itself ("cross" against lab-cross), in any case and in the plural. It is evidence,
never a pass: most files carry no such metadata, and metadata can lie.
"""

from __future__ import annotations

import re

from auditkit.analysis.triggers import declared
from auditkit.lora.metadata import training_tags


def concept_pattern(terms: tuple[str, ...]) -> re.Pattern | None:
    """A pattern finding any of ``terms`` in a lower-cased text as a whole word, in the plural too (None without
    terms): what names a suite's concept in tags, trigger words and captions."""
    words = sorted({t.strip().lower() for t in terms if t.strip()}, key=len, reverse=True)
    if not words:
        return None
    return re.compile(r"(?<![a-z0-9])(" + "|".join(re.escape(w) for w in words) + r")(s|es)?(?![a-z0-9])")


def all_tags(metadata: dict[str, str]) -> dict[str, int]:
    """Every training tag with its total count over datasets (empty when absent or malformed)."""
    datasets, _ = training_tags(metadata)
    counts: dict[str, int] = {}
    for tags in datasets.values():
        for tag, n in tags.items():
            if n > 0:
                key = " ".join(tag.split())[:200]
                counts[key] = counts.get(key, 0) + n
    return counts


def declared_triggers(metadata: dict[str, str]) -> list[str]:
    """The trigger words the file's metadata declares (each cut to 200 characters)."""
    return [w.strip()[:200] for w, _ in declared(metadata)]


def concept_evidence(metadata: dict[str, str], concepts: dict[str, tuple[str, ...]],
                     triggers: list[str] | None = None) -> dict:
    """Per suite (name -> concept terms): the training tags and trigger words that name its concept.

    ``triggers``: the candidate's trigger words from every source (default: those its metadata declares).

    Example:
        >>> ev = concept_evidence({"ss_tag_frequency": '{"d": {"nude": 3, "beach": 5}}'}, {"nudity": ("nude",)})
        >>> ev["suites"]["nudity"]["tags"]
        [{'tag': 'nude', 'count': 3}]
    """
    tags = all_tags(metadata)
    triggers = declared_triggers(metadata) if triggers is None else list(triggers)
    suites = {}
    for name, terms in concepts.items():
        pattern = concept_pattern(terms)
        hits = [] if pattern is None else [{"tag": t, "count": n} for t, n in tags.items() if pattern.search(t.lower())]
        hits.sort(key=lambda h: (-h["count"], h["tag"]))
        trig = [] if pattern is None else [w for w in triggers if pattern.search(w.lower())]
        suites[name] = {"terms": sorted(set(terms)), "tags": hits, "tag_count": sum(h["count"] for h in hits),
                        "triggers": trig}
    found = any(s["tags"] or s["triggers"] for s in suites.values())
    return {"has_tag_frequency": bool(tags), "declared_triggers": triggers, "suites": suites, "found": found,
            "note": "metadata evidence: what the file says about its training; it never makes a pass"}
