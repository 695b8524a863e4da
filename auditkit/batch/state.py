"""A batch's state on disk: what it was started with, and one line per finished adapter.

``batch.json`` holds the settings (written atomically; a resumed batch with other settings is refused).
``results.jsonl`` gets one JSON line per finished adapter, appended and fsynced only after its report is
written: a batch killed at any moment resumes with every finished adapter kept and none redone, and an
adapter killed mid-scan has no line, so it is scanned again (its run log resumes). A line cut by a kill
(no newline) is ignored, and dropped before the next append; a later line for an id already finished is
ignored (first wins).
"""

from __future__ import annotations

import json
from pathlib import Path

from auditkit.errors import BadInput
from auditkit.fsutil import append_lines, atomic_write_text

SCHEMA = "auditkit.batch/1"
MAX_STATE_BYTES = 2**30


def row_key(row: dict) -> tuple[str, str | None, str | None]:
    """An adapter is finished for its id and content, its sidecars' included: a file or sidecar changed under the
    same id is scanned again."""
    return row["id"], row.get("sha256"), row.get("sidecars_sha256")


class BatchState:
    def __init__(self, out: str | Path):
        self.dir = Path(out)
        self.settings_path = self.dir / "batch.json"
        self.results_path = self.dir / "results.jsonl"

    def start(self, settings: dict) -> None:
        """Record ``settings``, or check that a resumed batch was started with the same ones."""
        if not self.settings_path.exists():
            atomic_write_text(self.settings_path, json.dumps({"schema": SCHEMA, **settings}, indent=2) + "\n")
            return
        try:
            old = json.loads(self.settings_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise BadInput(self.settings_path, "not readable JSON (a corrupted batch folder: remove it, or choose "
                                               "another --out)") from None
        if not isinstance(old, dict) or old.get("schema") != SCHEMA:
            raise BadInput(self.settings_path, f"not an auditkit batch of schema {SCHEMA}")
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if changed:
            raise BadInput(self.settings_path, f"cannot resume: the batch was started with other {', '.join(changed)} "
                                               "(choose another --out)")

    def finished(self) -> dict[tuple, dict]:
        """Finished rows by :func:`row_key`, first line wins; a cut last line is ignored."""
        if not self.results_path.exists():
            return {}
        if self.results_path.stat().st_size > MAX_STATE_BYTES:
            raise BadInput(self.results_path, f"larger than {MAX_STATE_BYTES // 2**20} MiB")
        rows: dict[tuple, dict] = {}
        with open(self.results_path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if not line.endswith("\n"):
                    break  # cut by a kill: that adapter is scanned again
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    row = None
                if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                    raise BadInput(self.results_path, f"line {number} is not a result row (a corrupted batch state: "
                                                      "remove that line and run again)")
                rows.setdefault(row_key(row), row)
        return rows

    def record(self, row: dict) -> None:
        append_lines(self.results_path, [json.dumps(row, sort_keys=True)])
