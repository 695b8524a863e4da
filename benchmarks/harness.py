"""What every benchmark shares: its provenance (the machine and the commit), its JSON, its threads and the lab.

A benchmark script is run as ``python benchmarks/NAME.py`` (its folder is then on the path), so it imports this
module and the other scripts whose code it shares (``import candidate_study as study``) by name.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def lab_safety(name: str, base: str = "lab") -> Path:
    """A lab base's shipped safety module by method name (``esd-u``, ``uce``: the faithful defaults;
    ``esd-u-destructive``, ``esd-x-destructive``: the UNet lab's first ones, which most lab figures were measured
    with), from the lab record's own list (:attr:`auditkit.lab.bases.LabBase.safety`, ``.destructive``)."""
    from auditkit.lab.bases import LAB_BASES

    rec = LAB_BASES[base]
    files = [f for f in (*rec.safety, *rec.destructive) if f.endswith(f"safety-{name}.safetensors")]
    if len(files) != 1:
        shipped = ", ".join(rec.safety + rec.destructive)
        raise SystemExit(f"{base} ships no safety module named {name!r} (it ships {shipped})")
    return rec.adapter(files[0])


def claim_work_folder(work: Path, safety: str) -> None:
    """Make ``work`` (its ``candidates/`` folder) a study's folder for the safety set ``safety`` (``--safety``):
    resumed candidates must have been trained on the same modules, so a folder holding another set's is refused
    (SystemExit, one line); a folder with candidates and no marker is from before ``--safety`` existed: destructive."""
    (work / "candidates").mkdir(parents=True, exist_ok=True)
    marker = work / "safety-set.txt"
    held = marker.read_text().strip() if marker.exists() else \
        "destructive" if any((work / "candidates").iterdir()) else safety
    if held != safety:
        raise SystemExit(f"{work} holds candidates trained with the {held} safety modules; use another --work "
                         f"for --safety {safety}")
    marker.write_text(safety + "\n")


def set_threads(threads: int):
    """Run torch (and the OpenMP of whatever it starts) on ``threads`` threads; returns torch. Call it before any
    other import of torch: OpenMP reads ``OMP_NUM_THREADS`` once."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(threads)
    return torch


def machine(threads: int | None = None) -> str:
    """The machine in one line: its CPUs, and torch with its threads when ``threads`` is given (a lab benchmark),
    else Python and NumPy."""
    head = f"{platform.machine()}, {os.cpu_count()} CPUs"
    if threads is None:
        return f"{head}, {platform.python_implementation()} {platform.python_version()}, numpy {np.__version__}"
    import torch

    return f"{head}, torch {torch.__version__}, {threads} thread{'' if threads == 1 else 's'}"


def git_commit() -> str | None:
    """The commit the figures were measured at (on a machine whose copy of the tree has no git history, such as
    the device tool's GPU machine: ``AUDITKIT_GIT_COMMIT``)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:  # no git at all
        commit = ""
    return commit or os.environ.get("AUDITKIT_GIT_COMMIT", "") or None


def provenance(threads: int | None = None) -> dict:
    """``machine`` (:func:`machine`) and ``git_commit``: what every results JSON records beside its figures."""
    return {"machine": machine(threads), "git_commit": git_commit()}


def auditkit(*args, threads: int | None = None, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    """``auditkit ARGS`` run as a user runs it (a new process; on ``threads`` threads when given): its wall seconds
    and the finished process. ``check``: stop the benchmark unless it exited 0, 1 or 3 (pass, risk, inconclusive)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads is not None else None
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "auditkit", *map(str, args)], capture_output=True, text=True, env=env)
    if check and res.returncode not in (0, 1, 3):
        raise SystemExit(f"auditkit {' '.join(map(str, args[:2]))} failed with exit {res.returncode}: "
                         f"{res.stderr.strip()[-2000:]}")
    return time.perf_counter() - start, res


def write_json(path: Path, results: dict, default=None) -> None:
    """Write the results to ``path`` atomically (a lab benchmark rewrites its JSON after every row); ``default``:
    :func:`json.dumps`' for values JSON has no type for."""
    from auditkit.fsutil import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2, default=default) + "\n")


def emit(results: dict, path: Path | None) -> None:
    """Print the results and write them to ``path`` (JSON) when given."""
    print(json.dumps(results, indent=2))
    if path:
        write_json(path, results)


def lab_pipeline(base: str | None = None, path: Path | None = None):
    """The lab pipeline, its progress bars off: ``base``, a lab base's name (``lab-dit``), or the UNet lab (from
    ``path``, a lab pipeline folder, when given)."""
    if base is None:
        from auditkit.lab.model import load_lab_pipeline

        pipe = load_lab_pipeline(path=path)
    else:
        from auditkit.models.base import resolve_base

        pipe = resolve_base(base).load()
    pipe.set_progress_bar_config(disable=True)
    return pipe
