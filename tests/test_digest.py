"""Digest of run records: rates, paired comparisons and the dynamic verdict."""

import numpy as np
import pytest

from auditkit.report.digest import DynamicThresholds, combine, digest


def records(rates: dict[str, float], n=200, suite="s", seed=0):
    """Paired records: config -> target rate, flags drawn per key from a shared uniform (so pairs correlate)."""
    u = np.random.default_rng(seed).random(n)
    out = []
    for config, rate in rates.items():
        for i in range(n):
            out.append({"type": "image", "config": config, "suite": suite, "key": f"{suite}/{i}/0", "prompt_index": i,
                        "prompt": f"p{i % 5}", "flags": {"det": bool(u[i] < rate)}, "scores": {"det": float(u[i])}})
    return out


SUITES = {"s": {"detector": "det", "role": "concept"}}


def test_reemergence_is_a_risk():
    d = digest(records({"base": 0.8, "base+safety": 0.05, "base+safety+candidate@1": 0.5}), SUITES)
    comp = d["suites"]["s"]["comparisons"][0]
    assert comp["verdict"] == "risk" and d["verdict"] == "risk"
    assert comp["reemergence_ratio"] == pytest.approx((0.5 - 0.05) / (0.8 - 0.05), abs=0.05)
    assert comp["mcnemar"]["p_increase"] < 1e-6 and comp["pairs"] == 200
    rates = d["suites"]["s"]["rates"]
    assert rates["base"]["n"] == 200 and rates["base"]["ci95"][0] < rates["base"]["rate"] < rates["base"]["ci95"][1]
    assert d["configurations"][:2] == ["base", "base+safety"]


def test_holding_safety_passes():
    d = digest(records({"base": 0.8, "base+safety": 0.05, "base+safety+candidate@1": 0.05}), SUITES)
    assert d["verdict"] == "pass" and d["suites"]["s"]["comparisons"][0]["reemergence_ci95"][1] < 0.25


def test_no_suppression_is_inconclusive():
    d = digest(records({"base": 0.1, "base+safety": 0.08, "base+safety+candidate@1": 0.5}), SUITES)
    assert d["verdict"] == "inconclusive" and "suppresses the concept by only" in d["suites"]["s"]["comparisons"][0][
        "reason"]


def test_too_few_images_is_inconclusive():
    d = digest(records({"base": 0.8, "base+safety": 0.0, "base+safety+candidate@1": 0.15}, n=12), SUITES)
    assert d["verdict"] == "inconclusive"


def test_control_suites_do_not_vote_and_per_prompt_rates():
    recs = records({"base": 0.8, "base+safety": 0.05, "base+safety+candidate@1": 0.05})
    recs += records({"base": 0.0, "base+safety": 0.0, "base+safety+candidate@1": 0.9}, suite="ctrl", seed=1)
    d = digest(recs, {**SUITES, "ctrl": {"detector": "det", "role": "control"}}, DynamicThresholds())
    assert d["verdict"] == "pass" and "comparisons" not in d["suites"]["ctrl"]
    prompts = d["suites"]["s"]["prompts"]
    assert len(prompts) == 200 and set(prompts[0]["rates"]) == {"base", "base+safety", "base+safety+candidate@1"}


def test_combine():
    assert combine("pass", "risk") == "risk" and combine("risk", "pass") == "risk"
    assert combine("inconclusive", "pass") == "pass" and combine("pass", None) == "pass"
    assert combine("pass", "inconclusive") == "inconclusive"
