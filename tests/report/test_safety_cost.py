"""What the safety module costs on the control suites, from a run folder's base and base+safety images."""

import numpy as np
import pytest

from auditkit.report.safety_cost import safety_cost, summary_line

SUITES = {"k": {"role": "control", "detector": "lab"}, "c": {"role": "concept", "detector": "lab"}}


class HeadsDetector:
    """Reads an image's shape and colour from its first pixel (red channel: shape index, green: colour index)."""

    config = {"heads": {"shape": ["circle", "square", "cross"], "colour": ["red", "blue"]}}

    def probabilities(self, images):
        images = np.asarray(images)
        out = {}
        for head, channel in (("shape", 0), ("colour", 1)):
            p = np.zeros((len(images), len(self.config["heads"][head])))
            p[np.arange(len(images)), images[:, 0, 0, channel]] = 1
            out[head] = p
        return out


def run_folder(tmp_path, safe_colour_wrong: bool):
    """Base draws what is asked; base+safety draws the right shape and, if asked to, the wrong colour."""
    from PIL import Image

    records = []
    prompts = [("a red circle", 0, 0), ("a blue square", 1, 1), ("a red square", 1, 0), ("a blue circle", 0, 1)]
    for config in ("base", "base+safety"):
        for i, (prompt, shape, colour) in enumerate(prompts):
            img = np.zeros((4, 4, 3), np.uint8)
            img[..., 0] = shape
            img[..., 1] = 1 - colour if (config == "base+safety" and safe_colour_wrong) else colour
            rel = f"images/{config}/k/{i}.png"
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(tmp_path / rel)
            records.append({"config": config, "suite": "k", "key": f"k/{i}/0", "prompt": prompt, "image": rel})
    records.append({"config": "base", "suite": "c", "key": "c/0/0", "prompt": "a red cross", "image": "x.png"})
    return records


@pytest.mark.parametrize("wrong", [False, True])
def test_cost_compares_base_and_base_plus_safety_on_the_control_suites(tmp_path, wrong):
    cost = safety_cost(run_folder(tmp_path, wrong), SUITES, tmp_path, {"lab": HeadsDetector()})
    assert cost["measured"] and cost["suites"] == ["k"] and cost["pairs"] == 4
    assert cost["adherence"]["base"]["colour"]["rate"] == 1.0
    assert cost["adherence"]["base+safety"]["shape"]["rate"] == 1.0
    assert cost["adherence"]["base+safety"]["colour"]["rate"] == (0.0 if wrong else 1.0)
    assert cost["kept"] == {"shape": 1.0, "colour": 0.0 if wrong else 1.0}
    assert (cost["pixel_similarity"] < 1.0) == wrong
    assert ("colour adherence 100.0% → 0.0%" in summary_line(cost)) == wrong


def test_cost_without_heads_is_pixels_only(tmp_path):
    cost = safety_cost(run_folder(tmp_path, True), SUITES, tmp_path, {"lab": object()})
    assert cost["measured"] and "adherence" not in cost and cost["pixel_similarity"] < 1.0
    assert summary_line(cost).startswith("pixel similarity")


def test_cost_is_not_measured_without_a_control_suite_or_a_safety_module(tmp_path):
    records = run_folder(tmp_path, False)
    no_control = safety_cost(records, {"c": SUITES["c"]}, tmp_path, {})
    assert no_control == {"measured": False, "reason": "no control suite in this scan"}
    no_safety = safety_cost([r for r in records if r["config"] == "base"], SUITES, tmp_path, {})
    assert not no_safety["measured"] and "no safety module" in no_safety["reason"]
    assert summary_line(no_safety).startswith("not measured (no safety module")
    assert summary_line(None) is None  # a report written before the cost was recorded


def test_reports_with_and_without_the_cost_read_back_and_render(tmp_path):
    import json

    from auditkit.report.build import SCHEMA, read_report
    from auditkit.report.html import render_html

    cost = safety_cost(run_folder(tmp_path, True), SUITES, tmp_path, {"lab": HeadsDetector()})
    report = {"schema": SCHEMA, "candidate": {"components": {}, "coverage": {"fraction": 1.0}},
              "dynamic": {"adapter_coverage": {}, "thresholds": {}, "safety_cost": cost}}
    for with_cost in (True, False):
        if not with_cost:
            del report["dynamic"]["safety_cost"]
        (tmp_path / "report.json").write_text(json.dumps(report))
        assert read_report(tmp_path)["dynamic"].get("safety_cost") == (cost if with_cost else None)
    html = render_html({"verdict": "inconclusive", "reasons": [], "evidence": {"level": "behaviour", "gathered": []},
                        "mode": "full", "candidate": None, "safety": None, "architecture": "lab", "created": "",
                        "static": None, "repair": None, "concept_check": None, "metadata_evidence": None,
                        "schema": SCHEMA, "auditkit_version": "0",
                        "dynamic": {"images": 8, "device": "cpu", "dtype": "float32", "verdict": "pass",
                                    "adapter_coverage": {}, "mode": "reemergence", "configurations": [],
                                    "suites": {}, "safety_cost": cost, "run_log": str(tmp_path / "run.jsonl")}})
    assert 'id="safety-cost"' in html and "colour adherence 100.0% → 0.0%" in html
