"""The run log: ``run.jsonl``, the one contract between rendering, digest and report.

Line 1 is the :class:`Header`; every further line one :class:`ImageRecord` (a scored image).
The log is append-only: a killed run continues where it stopped, and ``auditkit report`` re-renders
from it without a model. Processes of a distributed launch append to shard logs
``run.rank<r>.jsonl`` (same records, no header) that :func:`merge_shards` folds into the run log.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TypedDict

import numpy as np

from auditkit.errors import BadInput, Unscannable
from auditkit.fsutil import append_lines, atomic_write_text
from auditkit.records import FLAG, INDEX, NUMBER, OBJECT, REAL, TEXT, check, fields, list_of, map_of, optional

RUN_SCHEMA = "auditkit.run/1"
SHARD_GLOB = "run.rank*.jsonl"


class Header(TypedDict, total=False):
    """The first line: what the run is, so a resumed run can be checked against it."""

    type: str  # "header"
    schema: str  # RUN_SCHEMA
    base: str
    suites: dict[str, dict]  # name -> detector, role, version, path, concept, prompts
    multipliers: list[float]
    steps_override: int | None
    adapters: dict[str, str]  # role -> SHA-256 of the file
    detectors: dict[str, dict]  # name -> pinned profile
    seeds: str
    triggers: list[str]  # trigger words prepended in the suites' trigger variants (absent without)


class ImageRecord(TypedDict):
    """One rendered and scored image. ``key`` is identical across configurations (the pairing)."""

    type: str  # "image"
    config: str  # configuration name, e.g. "base+safety+candidate@1"
    key: str  # "<suite>/<prompt index>/<image index>"
    suite: str
    prompt_index: int
    image_index: int
    prompt: str
    seed: int
    guidance: float
    steps: int
    image: str  # path of the PNG, relative to the run folder
    scores: dict[str, float]  # detector -> score in [0, 1]
    flags: dict[str, bool]  # detector -> score >= the detector's threshold
    # (optional) an edit suite's input image, relative to the run folder (absent for text-to-image suites);
    # "frames": a clip's sampled frames the detectors scored (the image is their strip; absent for images)


# What each field must hold when read back (a tampered log is one line naming the field, not an internal error).
IMAGE_SHAPE = fields({
    "type": TEXT, "config": TEXT, "key": TEXT, "suite": TEXT, "prompt_index": INDEX, "image_index": INDEX,
    "prompt": TEXT, "seed": INDEX, "guidance": NUMBER, "steps": INDEX, "image": TEXT,
    "scores": map_of(REAL), "flags": map_of(FLAG), "input_image": TEXT, "frames": INDEX,
}, required=tuple(ImageRecord.__annotations__))
SUITE_SHAPE = fields({"detector": TEXT, "role": TEXT, "version": INDEX, "path": optional(TEXT),
                      "concept": optional(TEXT), "prompts": INDEX, "sha256": optional(TEXT), "variant_of": TEXT,
                      "prefix": TEXT, "phrase": TEXT, "placement": TEXT,
                      "input_image": TEXT}, required=("detector",))
HEADER_SHAPE = fields({
    "schema": TEXT, "base": TEXT, "suites": map_of(SUITE_SHAPE), "multipliers": list_of(NUMBER),
    "steps_override": optional(INDEX), "adapters": map_of(TEXT), "detectors": map_of(OBJECT), "seeds": TEXT,
    "triggers": list_of(TEXT), "full_models": map_of(TEXT), "render": OBJECT,
})
_CORRUPTED = " (a corrupted run log: remove the folder)"


def load_images(run_dir: str | Path, records: list[dict]) -> np.ndarray:
    """The images of ``records`` (their ``image`` paths, relative to ``run_dir``) as uint8 N × H × W × 3, each read
    as any untrusted image is (:func:`auditkit.images.read_image`: size-checked, one line naming a bad file)."""
    from auditkit.images import read_image

    run_dir = Path(run_dir)
    out = [np.asarray(read_image(run_dir / r["image"]), dtype=np.uint8) for r in records]
    return np.stack(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def shard_name(rank: int) -> str:
    return f"run.rank{rank}.jsonl"


class RunLog:
    """``run.jsonl`` in ``run_dir`` (or a shard log named ``name``). Append-only."""

    def __init__(self, run_dir: str | Path, name: str = "run.jsonl"):
        self.dir = Path(run_dir)
        self.path = self.dir / name

    def header(self) -> Header | None:
        if not self.path.exists():
            return None
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            first = fh.readline()
        if not first.strip():
            return None
        header = self._parse(first, 1)
        if header.get("type") != "header":
            raise BadInput(self.path, "line 1 is not a run-log header" + _CORRUPTED)
        check(self.path, "line 1 (the header)", header, HEADER_SHAPE, _CORRUPTED)
        return header

    def records(self) -> list[ImageRecord]:
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if not line.endswith("\n"):
                    break  # a line cut by a kill: ignored (dropped before the next append), its image made again
                rec = self._parse(line, number)
                if rec.get("type") == "image":
                    check(self.path, f"line {number} is not an image record", rec, IMAGE_SHAPE,
                          " (a corrupted run log: remove that line, or the folder)")
                    out.append(rec)
        return out

    def _parse(self, line: str, number: int) -> dict:
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):  # ValueError: also an integer of more digits than Python converts
            rec = None
        if not isinstance(rec, dict):
            raise BadInput(self.path, f"line {number} is not a JSON record (a corrupted run log: remove that line, "
                                      "or the folder)")
        return rec

    def start(self, header: dict) -> None:
        """Write the header, or check that a resumed run matches it."""
        old = self.header()
        if old is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.append([{"type": "header", "schema": RUN_SCHEMA, **header}])
        elif {k: old.get(k) for k in header} != header:
            changed = sorted(k for k in header if old.get(k) != header[k])
            raise BadInput(self.path, f"cannot resume: the run was started with other {', '.join(changed)}")

    def append(self, records: list[dict]) -> None:
        append_lines(self.path, [json.dumps(rec, sort_keys=True) for rec in records])


@contextlib.contextmanager
def locked(run_dir: str | Path):
    """Hold ``run_dir``'s lock while a run writes into it; a second run into the same folder is
    refused at once (two runs appending to one log duplicated records and crashed on temp files)."""
    import fcntl

    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".auditkit.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInput(folder, "another auditkit run is writing into this folder; wait for it or choose "
                                   "another --out") from None
        try:
            yield folder
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _record_order(rec: dict) -> tuple:
    return rec["config"], rec["suite"], rec["prompt_index"], rec["image_index"], rec["key"]


def merge_shards(run_dir: str | Path) -> int:
    """Fold every shard log of ``run_dir`` into its ``run.jsonl`` and remove the shards.

    Records already in the run log keep their place; new ones (the first of each (configuration,
    key)) follow, sorted by configuration, suite, prompt and image. The run log is rewritten
    atomically before any shard is removed, so a kill at any point loses nothing. Returns the number
    of records added.
    """
    log = RunLog(run_dir)
    shards = sorted(log.dir.glob(SHARD_GLOB))
    if not shards:
        return 0
    header = log.header()
    if header is None:
        raise Unscannable(shards[0], "a shard log without a run log (run.jsonl) to merge it into; remove it")
    records = log.records()
    seen = {(r["config"], r["key"]) for r in records}
    new = {}
    for path in shards:
        for rec in RunLog(log.dir, path.name).records():
            new.setdefault((rec["config"], rec["key"]), rec)
    added = sorted((r for k, r in new.items() if k not in seen), key=_record_order)
    lines = [json.dumps(r, sort_keys=True) + "\n" for r in [header, *records, *added]]
    atomic_write_text(log.path, "".join(lines))
    for path in shards:
        path.unlink()
    return len(added)
