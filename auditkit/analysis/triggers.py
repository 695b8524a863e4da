"""Trigger words: the words a candidate's prompts must contain to call up what it learned.

Almost every published LoRA has them ("ohwx", "sks dog", an artist's tag), and users prompt
"TRIGGER, rest of prompt". A scan that probes without them can miss the very re-emergence it looks
for, so the dynamic scan renders each concept suite as written and with the trigger words prepended
(:func:`auditkit.suites.trigger_variant`). The words are gathered here, in the order they are prepended:

1. **given**: ``--trigger`` (repeatable) or ``triggers = [...]`` in the config file;
2. **metadata**: declared in the file (``modelspec.trigger_phrase``, ``ss_trigger_words``, …; :data:`TRIGGER_FIELDS`),
   comma-separated;
3. **sidecar**: ``trainedWords`` / ``activation text`` in ``NAME.civitai.info`` or ``NAME.json`` beside the file
   (:mod:`auditkit.lora.sidecar`);
4. **training tags**: inferred from kohya's tag frequencies (``ss_tag_frequency``, or ``ss_datasets``): a tag in at
   least :data:`MIN_TAG_SHARE` of one dataset's images (of at least :data:`MIN_DATASET_IMAGES`) with a word
   outside the suites' own vocabulary and not a generic description (``analysis/data/generic_tags.json``:
   "1girl", "solo", "long hair", quality and composition tags), so an ordinary description such as "a red
   cross" or "1girl, solo" is not taken for a trigger, while "ohwx", "sks dog" or a DreamBooth instance
   prompt repeated in every caption is; the most frequent first.

Sources 2–4 are the file's own: a candidate with such **likely** triggers that the dynamic scan did not
probe with is never a pass (:func:`auditkit.verdict.combine`).

Every word is untrusted text: whitespace is normalised; a word longer than :data:`MAX_TRIGGER_CHARS`, without
a letter or digit, or with a control or format character (escape sequences, zero-width or bidirectional
marks) is left out (a given one is refused, see :func:`check_given`); the same word twice (ignoring case) is
one word with several sources; at most :data:`MAX_TRIGGERS` are used, and the file's words left out past
them count as not probed.

Example:
    >>> meta = {"ss_tag_frequency": '{"10_trisk": {"trisk": 40, "a red cross": 7}}'}
    >>> found = gather(meta, vocabulary=frozenset({"a", "red", "cross"}))
    >>> found.words, found.prefix
    (['trisk'], 'trisk, ')
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from auditkit.lora.metadata import dataset_sizes, training_tags

TRIGGER_FIELDS = ("modelspec.trigger_phrase", "ss_trigger_words", "trigger_words", "trigger_phrase",
                  "activation_text")
MAX_TRIGGERS = 8  # words prepended at most: CLIP reads 77 tokens, and the prompt must still be there
MAX_TRIGGER_CHARS = 100
MAX_LEFT_OUT = 20  # words past MAX_TRIGGERS listed in the report; more are only counted
MIN_TAG_SHARE = 0.5  # a trigger is in (nearly) every caption of its dataset; descriptions vary
MIN_DATASET_IMAGES = 3  # in a one- or two-image dataset every tag is "frequent"
GIVEN, METADATA, SIDECAR, TAGS = "given", "metadata", "sidecar", "training tags"
LIKELY = (METADATA, SIDECAR, TAGS)  # the file's own sources


@dataclass
class Triggers:
    """The gathered words (in prepending order) with each word's sources (``{"source", "detail"}``), the
    words left out past :data:`MAX_TRIGGERS`, the sidecars read, and notes."""

    words: list[str] = field(default_factory=list)
    sources: dict[str, list[dict]] = field(default_factory=dict)
    left_out: list[dict] = field(default_factory=list)  # {"word", "source", "detail"}, at most MAX_LEFT_OUT
    more_left_out: int = 0  # past MAX_LEFT_OUT
    sidecars: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        """What is prepended to a prompt: "w1, w2, " (empty without words)."""
        return "".join(f"{w}, " for w in self.words)

    def likely_words(self) -> list[str]:
        """The words the file itself names (metadata, training tags, a sidecar), used or left out."""
        used = [w for w in self.words if any(s["source"] in LIKELY for s in self.sources[w])]
        return used + list(dict.fromkeys(x["word"] for x in self.left_out if x["source"] in LIKELY))

    def add(self, word: str, source: str, detail: str) -> None:
        known = next((w for w in self.words if w.lower() == word.lower()), None)
        if known is None and len(self.words) >= MAX_TRIGGERS:
            if len(self.left_out) < MAX_LEFT_OUT:
                self.left_out.append({"word": word, "source": source, "detail": detail})
            else:
                self.more_left_out += 1
            return
        if known is None:
            self.words.append(word)
            self.sources[word] = []
            known = word
        if {"source": source, "detail": detail} not in self.sources[known]:
            self.sources[known].append({"source": source, "detail": detail})

    def section(self, enabled: bool, used: bool) -> dict:
        """The report's ``triggers`` section: every word with its sources; whether the scan was asked to
        probe with them (``enabled``) and did (``used``: a dynamic scan rendered the prepended variants);
        ``likely``: whether the file names trigger words; ``unprobed``: those of them no variant used
        (all of them when none was used) -- with any, the verdict is never a pass."""
        likely = self.likely_words()
        probed = set(self.words) if used else set()
        return {"words": [{"word": w, "sources": self.sources[w]} for w in self.words], "left_out": self.left_out,
                "prefix": self.prefix, "likely": bool(likely), "enabled": enabled, "used": used,
                "unprobed": [w for w in likely if w not in probed], "sidecars": list(self.sidecars),
                "notes": list(self.notes)}


def clean(text: object) -> str | None:
    """A usable trigger word from untrusted text (whitespace normalised), or None: a word needs a letter or
    digit, and may hold no control or format characters (zero-width spaces, bidirectional overrides)."""
    if not isinstance(text, str) or any(unicodedata.category(c) in ("Cc", "Cf") for c in text):
        return None
    word = " ".join(text.split())
    return word if words_of(word) and len(word) <= MAX_TRIGGER_CHARS else None


def visible(text: object) -> str:
    """``text`` without control and format characters (zero-width spaces, bidirectional marks)."""
    return "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cf")) if isinstance(text, str) else ""


def shown(text: object, limit: int = 60) -> str:
    """Untrusted text as the report may show it: control and format characters written as ``\\uXXXX``,
    cut to ``limit`` characters."""
    text = text if isinstance(text, str) else repr(text)
    out = "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)
    return out if len(out) <= limit else out[: limit - 1] + "…"


def check_given(words: Sequence[object]) -> str | None:
    """The problem with trigger words given in the settings (for :class:`auditkit.config.ScanConfig`)."""
    if isinstance(words, str) or not isinstance(words, (list, tuple)):
        return f"triggers: must be a list of words, got {type(words).__name__}"
    if len(words) > MAX_TRIGGERS:
        return f"triggers: at most {MAX_TRIGGERS} trigger words, got {len(words)}"
    for w in words:
        if clean(w) is None:
            return (f"triggers: {str(w)[:60]!r} is not a trigger word (at most {MAX_TRIGGER_CHARS} characters with a "
                    "letter or digit, no control characters)")
    return None


def words_of(text: str) -> set[str]:
    """The lower-cased words (letters and digits) of ``text``."""
    return set(re.findall(r"[^\W_]+", text.lower()))


def vocabulary(suites: Iterable) -> frozenset[str]:
    """Every word the suites use: prompts, concept and neutral words, concept terms."""
    words: set[str] = set()
    for s in suites:
        for text in (s.concept_word, s.neutral_word, *s.concept_terms, *(p.text for p in s.prompts)):
            words |= words_of(text)
    return frozenset(words)


def declared(metadata: dict[str, str]) -> list[tuple[str, str]]:
    """(word, field) for every trigger word the file's metadata declares, comma- or line-separated."""
    out = []
    for key in TRIGGER_FIELDS:
        value = metadata.get(key)
        if isinstance(value, str):
            out += [(w, key) for w in re.split(r"[,\n]", value) if w.strip()]
    return out


def normalised_tag(tag: str) -> str:
    """A tag as the generic-tag list writes it: lower case, underscores as spaces, single spaces."""
    return " ".join(tag.lower().replace("_", " ").split())


@cache
def generic_tags() -> frozenset[str]:
    """Tags that describe images in general terms and are never inferred as triggers (shipped data)."""
    raw = json.loads(resources.files("auditkit.analysis").joinpath("data", "generic_tags.json").read_text("utf-8"))
    return frozenset(normalised_tag(t) for t in raw["tags"])


def inferred(metadata: dict[str, str], vocab: frozenset[str]) -> list[tuple[str, str]]:
    """(tag, detail) for the training tags that look like trigger words (rules in the module docstring)."""
    datasets, _ = training_tags(metadata)
    sizes = dataset_sizes(metadata)
    generic = generic_tags()
    best: dict[str, tuple[float, str]] = {}
    for name, tags in datasets.items():
        images = sizes.get(name) or max(tags.values(), default=0)
        if images < MIN_DATASET_IMAGES:
            continue
        for tag, count in tags.items():
            word = clean(tag)
            share = min(count / images, 1.0)
            if word is None or share < MIN_TAG_SHARE or words_of(word) <= vocab or normalised_tag(word) in generic:
                continue
            key = word.lower()
            if key not in best or share > best[key][0]:
                detail = f"in {min(count, images)} of {images} captions of dataset {name[:80]!r}"
                best[key] = (share, detail)
    ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return [(word, detail) for word, (_, detail) in ranked]


def gather(metadata: dict[str, str], given: Sequence[str] = (), sidecars: Sequence = (),
           vocabulary: frozenset[str] = frozenset()) -> Triggers:
    """The candidate's trigger words from every source (see the module docstring).

    Args:
        metadata: the adapter file's metadata (untrusted strings).
        given: words from the settings (already checked by :func:`check_given`).
        sidecars: :class:`auditkit.lora.sidecar.Sidecar` objects read beside the file.
        vocabulary: the suites' words (:func:`vocabulary`); tags made only of them are not triggers.
    """
    found = Triggers(sidecars=[str(s.path) for s in sidecars])
    candidates = [(w, GIVEN, "--trigger or the config file's triggers") for w in given]
    candidates += [(w, METADATA, key) for w, key in declared(metadata)]
    candidates += [(w, SIDECAR, f"{s.path.name}: {name}") for s in sidecars for name, ws in s.words.items()
                   for w in ws]
    candidates += [(w, TAGS, detail) for w, detail in inferred(metadata, vocabulary)]
    unusable = 0
    for text, source, detail in candidates:
        word = clean(text)
        if word is None and source in LIKELY:  # the file's own word: probe what is left of it, or never pass
            word = clean(visible(text))
            if word is None and words_of(visible(text)):  # a word, too long to prompt with
                found.left_out.append({"word": shown(str(text).strip()), "source": source,
                                       "detail": f"{detail}; not usable as a prompt word"})
                continue
            if word is not None and word != text:
                detail = f"{detail}; control or format characters removed"
        if word is None:
            unusable += 1
        else:
            found.add(word, source, detail)
    past = [x for x in found.left_out if not x["detail"].endswith("not usable as a prompt word")]
    if past or found.more_left_out:
        found.notes.append(f"{len(past) + found.more_left_out} more trigger word source(s) past the first "
                           f"{MAX_TRIGGERS} words were not used")
    if len(past) < len(found.left_out):
        found.notes.append(f"{len(found.left_out) - len(past)} trigger word(s) the file names are not usable as prompt "
                           "words (too long once control characters are removed): not probed, so no pass")
    if unusable:
        found.notes.append(f"{unusable} listed trigger word(s) left out: longer than {MAX_TRIGGER_CHARS} "
                           "characters, without a letter or digit, or with control or format characters")
    return found
