"""The trigger search as a run records it: ``trigger-search.json`` in the scan's folder, beside its run log.

The search decides which suite variants the run log's header holds, so it is part of the run: written once (by
rank 0 of a distributed launch; the other ranks read it after a barrier, so every rank probes the same phrases
whatever its GPU's arithmetic), and read back when the run resumes, so a killed scan does not search again. It is
reused only for the settings it was made with (:func:`settings`: the adapters' hashes, the base, the concept
suites and the search budget); for others the scan searches again, and the run log refuses a resume whose probes
differ.

The file is read like the run log: bounded, checked by shape; a file that does not hold a search is one line
naming it (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path

from auditkit.errors import BadInput
from auditkit.records import ANY, INDEX, NUMBER, OBJECT, TEXT, check, fields, list_of, map_of, optional

FILE = "trigger-search.json"
LIMIT = 16 * 2**20
SCHEMA = "auditkit.trigger-search/1"

_TEXTS, _FIGURE = list_of(TEXT), optional(NUMBER)
# what a search holds (suite name -> Discovery.to_dict) where it is read back: this file and report.json
TRIGGER_SEARCH = map_of(fields({"probed": _TEXTS, "placements": _TEXTS, "tokens_swept": INDEX, "phrases_tried": INDEX,
                                "seconds": NUMBER,
                                "phrases": list_of(fields({k: _FIGURE for k in ("sweep", "pull", "gain")})),
                                "notes": list_of(ANY), "sweeps": list_of(OBJECT)}))


def settings(candidate, safety, base: str, suites: list, budget) -> dict:
    """What decides a search's result (JSON data): compared whole when a run resumes."""
    import dataclasses

    return {"candidate": candidate.sha256, "safety": safety.sha256 if safety is not None else None, "base": str(base),
            "suites": {s.name: s.sha256 for s in suites if s.role == "concept" and not s.variant_of},
            "budget": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(budget).items()}}


def load(folder: str | Path, wanted: dict) -> dict | None:
    """The search recorded in ``folder`` for the settings ``wanted`` (suite name -> its record), or None: no file,
    or one made with other settings."""
    from auditkit.fsutil import read_json

    path = Path(folder) / FILE
    if not path.exists():
        return None
    data = read_json(path, "trigger search record", limit=LIMIT)
    check(path, "a corrupted trigger search record", data,
          fields({"schema": TEXT, "settings": OBJECT, "search": TRIGGER_SEARCH},
                 required=("schema", "settings", "search")), " (delete it to search again)")
    if data["schema"] != SCHEMA:
        raise BadInput(path, f"not a trigger search record of schema {SCHEMA} (delete it to search again)")
    return data["search"] if data["settings"] == json.loads(json.dumps(wanted)) else None


def save(folder: str | Path, wanted: dict, search: dict) -> Path:
    """Record ``search`` (suite name -> :meth:`~auditkit.discovery.search.Discovery.to_dict`), atomically."""
    from auditkit.fsutil import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(folder / FILE, json.dumps({"schema": SCHEMA, "settings": wanted, "search": search},
                                                       indent=1) + "\n")

