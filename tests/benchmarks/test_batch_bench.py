"""benchmarks/batch.py at CI size: the batch and the sequential scans agree on every verdict and figure, triage
runs, and the on-paper figures are computed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from auditkit.lab.model import lab_pipeline_available  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not lab_pipeline_available(), reason="lab model not installed")]
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "batch.py"


def test_ci_size_batch_matches_sequential_scans(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    res = subprocess.run([sys.executable, str(SCRIPT), "--ci", "--no-ray", "--work", str(tmp_path / "w"), "--json",
                          str(tmp_path / "batch.json")], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((tmp_path / "batch.json").read_text())
    b = r["batch_vs_scans"]
    assert b["candidates"] == 2 and b["identical_verdicts_and_figures"] is True
    assert all(x == y for x, y in b["verdicts_batch_vs_scan"].values())
    assert b["batch_seconds"] > 0 and b["sequential_scans_seconds"] > 0
    assert r["triage"]["files"] == 3 and r["triage"]["with_safety"]["adapters_per_second"] > 0
    assert r["ray"] == {"skipped": "--no-ray"}  # the Ray path is tested in tests/batch/test_batch_lab.py
    paper = r["on_paper"]
    assert paper["sd15"]["adapters_per_day_per_gpu"] > paper["sdxl"]["adapters_per_day_per_gpu"] > 0
    assert paper["sd15"]["gpus_for_10000_adapters_a_day"] >= 1 and r["git_commit"]
