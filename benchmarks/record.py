"""What every benchmark records beside its figures: the machine and the commit, and the JSON it writes."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def provenance() -> dict:
    """The machine (CPU count, Python, NumPy) and the git commit the figures were measured at (on a machine
    whose copy of the tree has no git history, such as the device tool's GPU machine: ``AUDITKIT_GIT_COMMIT``)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:  # no git at all
        commit = ""
    commit = commit or os.environ.get("AUDITKIT_GIT_COMMIT", "")
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
                       f"{platform.python_version()}, numpy {np.__version__}",
            "git_commit": commit or None}


def emit(results: dict, path: Path | None) -> None:
    """Print the results and write them to ``path`` (JSON) when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
