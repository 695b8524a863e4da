"""benchmarks/extract.py at the lab's tiny size: every method measured, the dense one exact, each truncation
keeping its energy, the cancellation error shrinking as more energy is kept."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "extract.py"


def test_tiny_run_measures_dense_and_truncated(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--arch", "lab", "--limit", "40", "--energies", "0.9,0.999",
                          "--json", tmp_path / "extract.json"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((tmp_path / "extract.json").read_text())
    assert r["architecture"] == "lab" and r["modules"] == 40
    m = r["methods"]
    assert set(m) == {"dense", "truncated@0.9", "truncated@0.999"}
    assert m["dense"]["cancellation_error_vs_dense_reference"] < 1e-8 and m["dense"]["energy_kept_min"] == 1.0
    assert m["truncated@0.9"]["energy_kept_min"] >= 0.9 and m["truncated@0.999"]["energy_kept_min"] >= 0.999
    assert m["truncated@0.999"]["cancellation_error_vs_dense_reference"] < \
        m["truncated@0.9"]["cancellation_error_vs_dense_reference"]
    assert m["truncated@0.9"]["rank_max"] < m["dense"]["rank_max"]
    assert all(v["seconds"] > 0 and v["peak_memory_mb"] > 0 for v in m.values())
