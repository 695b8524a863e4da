"""report.html from a run folder: images that are gone are named, not silently dropped (issue 10.17)."""

from auditkit.report.html import image_grids, render_html
from auditkit.runlog import RunLog


def _report(run_dir):
    return {"dynamic": {"run_log": str(run_dir / "run.jsonl"), "show_flagged": False, "images": 3, "device": "cpu",
                        "dtype": "float32", "verdict": "inconclusive", "adapter_coverage": {}, "mode": "reemergence",
                        "configurations": ["base"], "suites": {"s": {"role": "concept", "detector": "d",
                                                                     "rates": {}, "prompts": []}}}}


def test_missing_and_escaping_images_are_named_in_the_grid(tmp_path):
    from PIL import Image

    log = RunLog(tmp_path)
    log.start({"suites": {"s": {}}})
    base = {"type": "image", "config": "base", "suite": "s", "prompt_index": 0, "image_index": 0, "prompt": "p",
            "seed": 1, "guidance": 5.0, "steps": 2, "scores": {"d": 0.0}, "flags": {"d": False}}
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "ok.png")
    log.append([{**base, "key": "s/0/0", "image": "images/ok.png"},
                {**base, "key": "s/1/0", "image": "images/gone.png"},
                {**base, "key": "s/2/0", "image": "../../etc/passwd"}])
    cell = image_grids(_report(tmp_path))["s"]["base"]
    assert [c.get("missing") for c in cell] == [None, "file missing", "outside the run folder"]
    assert "uri" in cell[0] and "uri" not in cell[2]
    assert "images/gone.png: file missing" in render_html({**_minimal(), **_report(tmp_path)})


def _minimal():
    return {"verdict": "inconclusive", "reasons": [], "evidence": {"level": "metadata", "gathered": ["metadata"]},
            "mode": "metadata", "candidate": None, "safety": None, "architecture": "lab", "created": "",
            "static": None, "repair": None, "concept_check": None, "metadata_evidence": None,
            "schema": "auditkit.report/2", "auditkit_version": "0"}
