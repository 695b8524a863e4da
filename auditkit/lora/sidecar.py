"""Sidecar files beside an adapter: the trigger words its publisher lists.

Model hubs and UIs keep what a LoRA needs in its prompts beside the file, not in it:

* ``NAME.civitai.info`` (civitai helper extensions; the civitai API's model-version JSON):
  ``trainedWords``, a list of strings, each one or more comma-separated words;
* ``NAME.json`` (AUTOMATIC1111's extra-networks user metadata: ``activation text``, a comma-separated
  string; some tools save the civitai JSON here instead, with ``trainedWords``).

A sidecar is untrusted input, read as data only (bounded JSON, never executed): at most
``MAX_SIDECAR_BYTES``, read without blocking (a FIFO or device is refused), UTF-8 JSON holding an
object. A sidecar that is present but malformed is a one-line :class:`~auditkit.errors.BadInput`
naming it, not silently skipped: it is where the publisher says which words call the adapter up, and a
scan that ignored it could pass an adapter whose re-emergence only its trigger words show. Move the
file away to scan without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from auditkit.errors import BadInput
from auditkit.fsutil import read_json

MAX_SIDECAR_BYTES = 4 * 2**20  # civitai info files carry image metadata too: tens to hundreds of KB
MAX_WORDS = 1000  # entries read from one field; more is not a list of trigger words
SUFFIXES = (".civitai.info", ".json")
FIELDS = ("trainedWords", "activation text")  # civitai, AUTOMATIC1111


@dataclass(frozen=True)
class Sidecar:
    """Words one sidecar lists, with the field they came from (field -> words, in file order)."""

    path: Path
    words: dict[str, list[str]]


def sidecar_paths(adapter: str | Path) -> list[Path]:
    """The sidecar files present beside ``adapter`` (``model.safetensors`` -> ``model.civitai.info``,
    ``model.json``); a dangling link counts as present, so reading it reports the problem."""
    adapter = Path(adapter)
    stem = adapter.name[: -len(adapter.suffix)] if adapter.suffix else adapter.name
    candidates = [adapter.with_name(stem + suffix) for suffix in SUFFIXES]
    return [p for p in candidates if p != adapter and (p.exists() or p.is_symlink())]


def read_sidecar(path: str | Path) -> Sidecar:
    """The trigger-word fields of one sidecar file (see the module docstring for what is refused)."""
    path = Path(path)
    try:
        data = read_json(path, "sidecar", limit=MAX_SIDECAR_BYTES)
    except BadInput as exc:
        raise BadInput(path, f"{exc.problem} (it is read for the adapter's trigger words; fix or move it)") from None
    if not isinstance(data, dict):
        raise BadInput(path, "sidecar is not a JSON object")
    words = {}
    for name in FIELDS:
        if name in data and data[name] not in (None, "", []):
            words[name] = _words(path, name, data[name])
    return Sidecar(path, words)


def read_sidecars(adapter: str | Path) -> list[Sidecar]:
    """Every sidecar beside ``adapter``, read (an absent one is simply not there)."""
    return [read_sidecar(p) for p in sidecar_paths(adapter)]


def _words(path: Path, name: str, value: object) -> list[str]:
    """A field's words: a string or a list of strings, each split at commas and line breaks."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise BadInput(path, f"sidecar field {name!r} must be a string or a list of strings, got "
                             f"{type(value).__name__}")
    if len(items) > MAX_WORDS:
        raise BadInput(path, f"sidecar field {name!r} has more than {MAX_WORDS} entries")
    return [w for item in items for w in re.split(r"[,\n]", item) if w.strip()]
