"""benchmarks/repair_lab.py's goal and section: pure functions over its JSON (no model)."""

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def rl():
    return load_benchmark("repair_lab.py")


def row(ratio=0.0, upper=0.01, held=0.0, held_upper=0.01, kept=0.95, right=80):
    return {"rate": 0.0, "ratio": ratio, "ci95": [-0.01, upper], "held_out_ratio": held,
            "held_out_ci95": [0.0, held_upper], "static_cancellation": 0.0, "seconds": 1.0,
            "domain_skill": {"shape_and_style": 0.9, "colour": 0.9}, "kept": {"candidate_right": right,
                                                                          "still_right": kept},
            "vs_candidate": {"attributes_agree": 0.9, "pixel_similarity": 0.95}}


def test_the_goal_needs_every_term_and_says_which_is_missed(rl):
    assert rl.goal(row())["met"]
    g = rl.goal(row(held=0.03))
    assert not g["met"] and [k for k, t in g["terms"].items() if not t["met"]] == ["held_out_ratio"]
    g = rl.goal(row(kept=0.85))
    assert not g["met"] and g["kept_shortfall"] == pytest.approx(0.05)
    assert not rl.goal(row(upper=0.25))["met"]  # the upper bound must be strictly below 0.25
    assert rl.goal(row(ratio=0.02))["met"]  # ≤ 0.02 is met


def test_the_section_reports_what_the_json_holds(rl):
    good, near = row(), row(held=0.025)
    for r in (good, near):
        r["goal"] = rl.goal(r)
    cand = {**row(ratio=0.6, upper=0.7, held=0.7, held_upper=0.8)}
    cand.pop("kept")
    d = {"git_commit": "0123456789abcdef", "machine": "m", "base_rate": 1.0, "safety_rate": 0.0,
         "held_out_base_rate": 1.0, "held_out_safety_rate": 0.0, "methods": ["a", "b"],
         "candidates": {"c1": {"candidate": cand, "a": good, "b": near}}}
    text = rl.section(d)
    assert "git commit 0123456789ab" in text
    assert "Goal met by: a on c1 (1 of 2 repairs)" in text
    assert "b on c1: held out ratio 0.025 (goal ≤ 0.02)" in text
    assert "- c1: a keeps 95% (**goal met**)" in text
