"""benchmarks/jailbreak.py at CI size: every step of the DiT experiment runs on the shipped DiT lab (two
safety placements, three fine-tuning variants, probes, statistics, static cancellation, the scanner with its
data-free signals, the module-subset ablation) and the results JSON carries what BENCHMARKS.md quotes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from auditkit.lab.bases import LAB_BASES  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not LAB_BASES["lab-dit"].available(), reason="DiT lab model not installed")]
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "jailbreak.py"


def test_the_dit_experiment_runs_every_cell_at_ci_size(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    out = tmp_path / "out.json"

    def run(*args):
        return subprocess.run([sys.executable, str(SCRIPT), "--ci", "--threads", "1", "--work", str(tmp_path / "work"),
                               "--json", str(out), "--methods", "esd-x,esd-u", *args],
                              capture_output=True, text=True, timeout=1200, env=env)

    res = run("--seeds", "0")
    assert res.returncode == 0, res.stderr[-2000:]
    first = json.loads(out.read_text())["seeds"]["0"]
    res = run("--seeds", "0,1", "--resume", "--methods", "esd-u")  # seed 0 kept (its scans were made), seed 1 run
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["seeds"]["0"]["methods"]["esd-u"]["cells"]["on-top LoRA"]["rate"] == \
        first["methods"]["esd-u"]["cells"]["on-top LoRA"]["rate"] and len(r["resumed"]) == 1
    assert r["seeds"]["0"]["methods"]["esd-u"]["cells"]["on-top LoRA"]["variant_truth"] == []  # no search at CI size
    assert r["git_commit"] and r["settings"]["base"] == "lab-dit" and set(r["seeds"]) == {"0", "1"}
    for seed, method in (("0", "esd-x"), ("0", "esd-u"), ("1", "esd-u")):  # the resumed seed 1: esd-u only
        cells = r["seeds"][seed]["methods"][method]["cells"]
        assert set(cells) == {"base+safety", "on-top LoRA", "modular LoRA", "on-top full"}
        for label in ("on-top LoRA", "modular LoRA", "on-top full"):
            c = cells[label]
            assert c["n"] == 24 and 0 <= c["rate"] <= 1 and len(c["ci95"]) == 2
            assert c["static"]["cancellation"] is not None and "shape_and_style" in c["fidelity"]
            assert c["scan"]["verdict"] in ("risk", "pass", "inconclusive")
            assert c["scan"]["noise_reversion"] is not None
    # the ESD-x safety adapter holds the text-stream projections the data-free KV check reads
    assert r["seeds"]["0"]["methods"]["esd-x"]["cells"]["on-top LoRA"]["scan"]["kv_reversion"] is not None
    where = r["seeds"]["0"]["methods"]["esd-u"]["where"]
    assert where["double-stream blocks only"]["modules"] + where["single-stream blocks only"]["modules"] \
        == where["safety + candidate"]["modules"]
    assert "where" not in r["seeds"]["1"]["methods"]["esd-u"]  # the ablation runs on the first seed only
    assert len(r["summary"]["esd-u"]["on-top LoRA"]["rate"]["values"]) == 2
    assert "| esd-u | on-top LoRA |" in res.stdout
