"""`auditkit scan --base lab`: the dynamic scan end to end on the shipped lab, resumable, re-renderable,
and its report renders in a real headless browser."""

import json
import shutil
import subprocess
import sys
from importlib import resources

import pytest
from browser import chromium, console_problems, needs_chromium

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from auditkit.lab.model import lab_pipeline_available  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not lab_pipeline_available(), reason="lab model not installed")]
SAFETY = str(resources.files("auditkit.lab").joinpath("assets", "adapters", "safety-esd-u-destructive.safetensors"))


def auditkit(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "auditkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def scaled_inverse(tmp_path, factor):
    """A candidate that undoes ``factor`` of the safety update (safety x (1 - factor) in effect)."""
    from auditkit.lora.adapter import LoraModule, read_adapter
    from auditkit.lora.write import save_adapter

    s = read_adapter(SAFETY)
    mods = {n: LoraModule(n, m.down, -factor * m.up, m.scale) for n, m in s.modules.items()}
    return save_adapter(mods, tmp_path / f"inverse-{factor}.safetensors", s.architecture)


@pytest.fixture(scope="module")
def risky_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dyn")
    cand = scaled_inverse(tmp, 0.6)
    # a risk either way: the trigger search (tested in test_scan_triggers.py and tests/discovery) is off here
    res = auditkit("scan", cand, "--safety", SAFETY, "--base", "lab", "--steps", "8", "--multipliers", "1",
                   "--no-trigger-search", "--out", tmp / "run")
    return tmp / "run", res, cand


def test_a_candidate_that_brings_the_concept_back_is_flagged(risky_run):
    run_dir, res, _ = risky_run
    assert res.returncode == 1, res.stderr
    report = json.loads((run_dir / "report.json").read_text())
    dyn = report["dynamic"]
    comp = dyn["suites"]["lab-cross"]["comparisons"][0]
    assert comp["verdict"] == "risk" and comp["reemergence_ratio"] > 0.25 and comp["pairs"] == 120
    assert dyn["adapter_coverage"]["candidate"]["fraction"] == 1.0
    assert set(dyn["configurations"]) == {"base", "base+safety", "base+safety+candidate@1", "base+candidate@1"}
    assert dyn["detectors"]["lab-cross"]["threshold"] == 0.5 and dyn["libraries"]["diffusers"]
    assert report["reasons"][0].startswith("dynamic (lab-cross")


def test_rerun_resumes_without_regenerating(risky_run):
    run_dir, _, cand = risky_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.png")}
    lines = (run_dir / "run.jsonl").read_text().count("\n")
    res = auditkit("scan", cand, "--safety", SAFETY, "--base", "lab", "--steps", "8", "--multipliers", "1",
                   "--no-trigger-search", "--out", run_dir)
    assert res.returncode == 1, res.stderr
    assert (run_dir / "run.jsonl").read_text().count("\n") == lines
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_report_re_renders_without_a_model(risky_run, tmp_path):
    run_dir, _, _ = risky_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "report.html").unlink()
    res = auditkit("report", copy)
    assert res.returncode == 1, res.stderr
    html = (copy / "report.html").read_text()
    assert "Behaviour: rendered probes" in html and html.count("data:image/png;base64,") >= 16
    assert auditkit("report", tmp_path / "nothing").returncode == 2


def test_a_candidate_that_keeps_the_safety_passes_unless_the_reversion_bar_is_lower(tmp_path):
    # undoing 10% of the destructive ESD-u update lets no cross through (the ablation: 25% lets 10% through), and
    # its noise reversion (measured 0.09) lies under the default pass bar (0.25): a pass
    from conftest import fewer_lab_images

    cand = scaled_inverse(tmp_path, 0.1)
    # the default suites in a third of their renders and the trigger search at its smallest (it has its own tests)
    args = ("scan", cand, "--safety", SAFETY, "--base", "lab", "--steps", "8", "--multipliers", "1",
            *fewer_lab_images(tmp_path), "--trigger-search-phrases", "8", "--out", tmp_path / "run")
    res = auditkit(*args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["dynamic"]["verdict"] == "pass" and 0.02 < report["concept_check"]["noise_reversion"]["reverted"]
    # the same run folder with --pass-reversion under that figure: nothing re-rendered, the pass withheld
    res = auditkit(*args, "--pass-reversion", "0.02")
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["verdict"] == "inconclusive" and report["dynamic"]["thresholds"]["pass_reversion"] == 0.02
    assert any("noise reversion >= 0.02" in r for r in report["reasons"])
    assert auditkit(*args, "--pass-reversion", "1.5").returncode == 2  # outside [0, 1]: a one-line error


@needs_chromium
def test_report_renders_in_a_headless_browser(risky_run, tmp_path):
    import numpy as np
    from PIL import Image

    run_dir, _, _ = risky_run
    shot = tmp_path / "shot.png"
    res = chromium((run_dir / "report.html").as_uri(), tmp_path / "profile", "--window-size=1000,2400",
                   f"--screenshot={shot}")
    assert shot.is_file(), res.stderr[-2000:]
    assert not console_problems(res.stderr), console_problems(res.stderr)
    img = np.asarray(Image.open(shot).convert("RGB"))
    # the verdict banner (red for risk) and the rendered image grids (many distinct colours) are visible
    assert ((img[..., 0] > 180) & (img[..., 1] < 80) & (img[..., 2] < 80)).sum() > 5000
    assert len(np.unique(img.reshape(-1, 3) // 16, axis=0)) > 200
