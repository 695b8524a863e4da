"""benchmarks/candidate_study.py: the BENCHMARKS section is built from the study's JSON alone, and its error counts
follow the scanner's rule (an inconclusive verdict on a clear truth counts against the scanner)."""

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def study():
    return load_benchmark("candidate_study.py")


def _row(ratio, ci, label, judge_label, scan_ratio, verdict, default_verdict, seed=0):
    spec = {"safety": "esd-u", "data": "neon", "mode": "on-top", "targets": "transformer", "rank": 8, "steps": 400,
            "lr": 1e-3, "seed": seed, "n_data": None}
    return {"spec": spec,
            "truth": {"ratio": ratio, "ci95": ci, "label": label,
                      "judge": {"ratio": ratio / 2, "ci95": [0.0, ratio], "label": judge_label}},
            "scan": {"verdict": verdict, "static_verdict": "inconclusive", "dynamic_ratio": scan_ratio,
                     "dynamic_ci95": [scan_ratio - 0.1, scan_ratio + 0.1], "dynamic_upper": scan_ratio + 0.11,
                     "static_cancellation": 0.05, "noise_reversion": 0.4, "concept_check": None, "seconds": 61.0,
                     "default_verdict": default_verdict,
                     "default_comparisons": [{"configuration": "base+safety+candidate@1.5",
                                              "ratio": scan_ratio + 0.2}]}}


def test_section_reads_every_figure_from_the_json(study):
    rows = {"a": _row(0.63, [0.56, 0.69], "re-emerges", "re-emerges", 0.53, "risk", "risk"),
            "a-s1": _row(0.71, [0.65, 0.77], "re-emerges", "safe", 0.80, "risk", "risk", seed=1),
            "b": _row(0.0, [0.0, 0.01], "safe", "safe", 0.0, "inconclusive", "risk"),
            "c": _row(0.30, [0.2, 0.4], "borderline", "safe", 0.2, "pass", "pass")}
    listed = list(rows.values())
    results = {"git_commit": "abcdef1234567890", "machine": "test machine",
               "truth": {"n": 240, "base_rate": 1.0, "safety_rate": {"esd-u": 0.004, "esd-x": 0.0},
                         "judge": {"base_rate": 1.0, "safety_rate": {"esd-u": 0.0, "esd-x": 0.0}}},
               "candidates": rows,
               "summary": {"scan": study.confusion(listed, "verdict"),
                           "scan_default_multipliers": study.confusion(listed, "default_verdict"),
                           "scan_vs_judge_truth": study.confusion(listed, "verdict", "judge"),
                           "static_only": study.confusion(listed, "static_verdict"),
                           "truth_labels_agree_with_judge": 2,
                           "spearman_vs_true_ratio": {"dynamic_ratio": {"rho": 0.9876, "n": 4}}}}
    text = study.section(results, "CMD")
    assert "4 lab candidates" in text and "`CMD`" in text and "abcdef123456" in text
    assert "| a | esd-u | neon | on-top | transformer | 8 | 400 | 0.63 (0.56–0.69) | re-emerges |" in text
    # the inconclusive verdict on a safe truth is wrong, the borderline truth is set apart
    assert "| `scan --multipliers 1` | 2 | 0 | 0 | 0 | 1 | 1 | 0/2 (0%–84%) | – | 1/3 (1%–91%) |" in text
    assert "| `scan` (default multipliers 0.5, 1, 1.5) | 2 | 0 | 1 | 0 | 0 | 1 |" in text
    assert "agree on 2 of 4" in text
    assert "inside the truth's interval (240 pairs) for 2 of 4" in text  # a (0.53 in 0.56-0.69? no), b, c
    assert "c truth 0.30 (borderline), scan 0.20 upper 0.31 → pass" in text
    assert "a 0.63, 0.71" in text and "dynamic ratio 0.99 (n = 4)" in text
    assert "max 0.73 @1.5" in text
