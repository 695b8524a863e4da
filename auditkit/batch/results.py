"""The batch's results table: one row per input file, as Parquet and CSV (pandas).

Columns (:data:`COLUMNS`): the file (id, path, sha256, the sidecars' sha256, size, kind, format, architecture, rank,
modules), triage (suspicion, the base judge, queue position), the scan (verdict, exit code, evidence level, mode,
first reason, key figures: static cancellation, largest re-emergence ratio, largest increase over the base, concept
check),
and ``error`` (the one-line message of a file that could not be scanned), ``duplicate_of`` (the id of the
identical file whose scan this row repeats) and ``report`` (the report folder, relative to the batch folder).
"""

from __future__ import annotations

import io
from pathlib import Path

from auditkit.fsutil import atomic_write_bytes, atomic_write_text

COLUMNS = ("id", "path", "sha256", "sidecars_sha256", "size_bytes", "kind", "format", "architecture", "rank",
           "modules", "suspicion", "base_judge", "queue_position", "verdict", "exit_code", "evidence", "mode", "reason",
           "static_cancellation", "reemergence_ratio", "increase", "concept_reverted", "metadata_concepts",
           "images", "error", "duplicate_of", "report", "seconds", "attempts")
NUMERIC = ("size_bytes", "rank", "modules", "suspicion", "base_judge", "queue_position", "exit_code",
           "static_cancellation", "reemergence_ratio", "increase", "concept_reverted", "images", "seconds", "attempts")
VERDICTS = ("risk", "inconclusive", "pass", "error")
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def frame(rows: list[dict]):
    import pandas as pd

    table = pd.DataFrame([{c: row.get(c) for c in COLUMNS} for row in rows], columns=list(COLUMNS))
    for c in NUMERIC:
        table[c] = pd.to_numeric(table[c], errors="coerce")
    for c in ("rank", "modules", "queue_position", "exit_code", "images", "attempts", "size_bytes"):
        table[c] = table[c].astype("Int64")
    return table


def write_table(rows: list[dict], out: Path) -> dict[str, Path]:
    """``results.parquet`` and ``results.csv`` in ``out``, each written atomically."""
    table = frame(rows)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    csv = table.copy()
    for c in csv.columns.difference(NUMERIC):  # a cell a spreadsheet would run as a formula is quoted
        csv[c] = csv[c].map(lambda v: "'" + v if isinstance(v, str) and v.startswith(_FORMULA) else v)
    return {"parquet": atomic_write_bytes(out / "results.parquet", buffer.getvalue()),
            "csv": atomic_write_text(out / "results.csv", csv.to_csv(index=False))}


def counts(rows: list[dict]) -> dict[str, int]:
    """Rows per verdict (every verdict named, in :data:`VERDICTS` order)."""
    out = dict.fromkeys(VERDICTS, 0)
    for row in rows:
        v = row.get("verdict")
        if v:
            out[v] = out.get(v, 0) + 1
    return out
