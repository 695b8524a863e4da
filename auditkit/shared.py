"""Renders shared by many candidates: the ``base`` and ``base+safety`` configurations.

Every candidate scanned against one base, one safety module and one set of suites (same prompts,
seeds, steps, detectors) renders the same ``base`` and ``base+safety`` images: only the
configurations holding the candidate differ. :func:`auditkit.dynamic.render_shared` renders them
once into a run folder of their own; :meth:`SharedRenders.seed` puts those records into a
candidate's run log (each image linked, or copied, into the candidate's run folder), after which the
runner renders only what is still missing, exactly as it resumes a killed scan. The candidate's run
folder then holds the same records and images a scan of its own would have rendered, and its report
(:mod:`auditkit.report`) is the same.

A suite only the candidate has (a trigger variant: its prompts start with the candidate's trigger
words) is not shared: its base and base+safety images are rendered in the candidate's own scan.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from auditkit.runlog import RunLog

SHARED_CONFIGS = ("base", "base+safety")
# header fields that must agree for a shared image to be the candidate's own (suites are compared one by one)
_SAME = ("base", "steps_override", "detectors", "seeds")


@dataclass(frozen=True)
class SharedRenders:
    """The shared run folder and its header (what rendered it: base, suites, safety module, detectors,
    render settings)."""

    run_dir: Path

    @property
    def log(self) -> RunLog:
        return RunLog(self.run_dir)

    def configs(self) -> tuple[str, ...]:
        header = self.log.header() or {}
        return SHARED_CONFIGS if "safety" in header.get("adapters", {}) else SHARED_CONFIGS[:1]

    def mismatch(self, header: dict, render: dict) -> str | None:
        """Why the shared renders are not the images of a run with ``header`` rendering with ``render``
        (batch size, device, dtype: a batched call's numbers depend on them); None: they are."""
        shared = self.log.header()
        if shared is None:
            return f"{self.log.path} has no header (the shared renders were not made)"
        if shared.get("render") != render:
            return "other render settings (batch size, device or dtype)"
        for key in _SAME:
            if shared.get(key) != header.get(key):
                return f"other {key}"
        if shared.get("adapters", {}).get("safety") != header.get("adapters", {}).get("safety"):
            return "another safety module"
        if (shared.get("full_models") or {}).get("safety") != (header.get("full_models") or {}).get("safety"):
            return "another reference for the full-model safety module"
        for name, info in shared.get("suites", {}).items():
            if name in header.get("suites", {}) and header["suites"][name] != info:
                return f"another version of suite {name}"
        return None

    def seed(self, log: RunLog, header: dict, render: dict) -> int:
        """Add the shared records ``log`` lacks (configurations and suites it renders), their images linked
        into its folder first; returns how many. Raises ValueError when the run renders other images."""
        why = self.mismatch(header, render)
        if why is not None:
            raise ValueError(f"the shared renders in {self.run_dir} do not fit this run ({why})")
        configs, suites = self.configs(), set(header.get("suites", {}))
        done = {(r["config"], r["key"]) for r in log.records()}
        add = [r for r in self.log.records() if r["config"] in configs and r["suite"] in suites
               and (r["config"], r["key"]) not in done]
        for rec in add:
            _link(self.run_dir / rec["image"], log.dir / rec["image"], self.run_dir)
            if "input_image" in rec and not (log.dir / rec["input_image"]).exists():  # an edit suite's input
                _link(self.run_dir / rec["input_image"], log.dir / rec["input_image"], self.run_dir)
        if add:
            log.append(add)
        return len(add)


def _link(src: Path, dst: Path, root: Path) -> None:
    """``dst`` becomes ``src``'s image: a hard link (no copy) where the filesystem allows, else a copy;
    written beside and renamed, so a kill never leaves half an image under a record."""
    if root.resolve() not in src.resolve().parents:
        raise ValueError(f"{src}: a shared image outside the shared run folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.stem}.{os.getpid()}.link.png")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
