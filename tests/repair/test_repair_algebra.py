"""Repair algebra against dense references."""

from functools import partial

import numpy as np
import pytest

from auditkit.lora.adapter import LoraModule
from auditkit.repair.algebra import concatenate, overall_cancellation, project, safelora_module, sign_aware_module


def _mod(rng, name="m", out=24, inp=20, r=4, scale=0.5):
    return LoraModule(name, rng.standard_normal((r, inp)).astype(np.float32),
                      rng.standard_normal((out, r)).astype(np.float32), scale)


def test_concatenation_is_the_sum_of_the_updates():
    rng = np.random.default_rng(0)
    safe = {"a": _mod(rng, "a", r=4, scale=0.25), "b": _mod(rng, "b", r=2, scale=2.0)}
    ft = {"a": _mod(rng, "a", r=8, scale=1.0), "c": _mod(rng, "c", r=3, scale=0.125)}
    both = concatenate((safe, 1.0), (ft, 0.75))
    assert set(both) == {"a", "b", "c"}
    assert both["a"].rank == 12 and both["a"].scale == 1.0
    np.testing.assert_allclose(both["a"].delta(), safe["a"].delta() + 0.75 * ft["a"].delta(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both["b"].delta(), safe["b"].delta(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both["c"].delta(), 0.75 * ft["c"].delta(), rtol=1e-5, atol=1e-5)


def _dense_sign_aware(dc, ds):
    u, s, vt = np.linalg.svd(ds, full_matrices=False)
    k = int(np.sum(s > s[0] * 1e-6))
    u, vt = u[:, :k], vt[:k]
    m = u.T @ dc @ vt.T
    remove = m - np.diag(np.maximum(np.diag(m), 0))
    return dc - u @ remove @ vt


def test_sign_aware_projection_matches_dense_and_leaves_no_cancellation():
    rng = np.random.default_rng(1)
    safe = _mod(rng, r=4, scale=0.5)
    # a candidate that undoes most of the safety update, plus its own work elsewhere
    own = _mod(rng, r=6, scale=1.0)
    cand = concatenate(({"m": own}, 1.0), ({"m": safe}, -0.8))["m"]
    repaired, reports = project({"m": cand}, {"m": safe}, sign_aware_module)
    new = repaired["m"]
    np.testing.assert_allclose(new.delta(), _dense_sign_aware(cand.delta(), safe.delta()), rtol=1e-4, atol=1e-4)
    assert reports[0].cancellation_before == pytest.approx(0.8 - np.sum(own.delta() * safe.delta())
                                                           / np.sum(safe.delta() ** 2), rel=1e-4)
    assert reports[0].cancellation_after <= 1e-6
    assert overall_cancellation(repaired, {"m": safe}) <= 1e-6
    # what lies outside the safety subspace is kept exactly
    u, s, vt = np.linalg.svd(safe.delta(), full_matrices=False)
    pu, pv = u[:, :4] @ u[:, :4].T, vt[:4].T @ vt[:4]
    np.testing.assert_allclose(new.delta() - pu @ new.delta() @ pv, cand.delta() - pu @ cand.delta() @ pv,
                               atol=1e-4)


def test_sign_aware_keeps_a_reinforcing_candidate_and_modules_outside_safety():
    rng = np.random.default_rng(2)
    safe = _mod(rng, r=3)
    cand = LoraModule("m", safe.down.copy(), safe.up.copy(), safe.scale * 0.5)  # half the safety update again
    other = _mod(rng, "other")
    repaired, reports = project({"m": cand, "other": other}, {"m": safe}, sign_aware_module)
    np.testing.assert_allclose(repaired["m"].delta(), cand.delta(), atol=1e-4)
    assert repaired["other"] is other
    assert len(reports) == 1 and reports[0].cancellation_before == pytest.approx(-0.5, rel=1e-4)


def test_safelora_projects_only_modules_below_the_threshold():
    rng = np.random.default_rng(3)
    safe = {"x": _mod(rng, "x", r=4), "y": _mod(rng, "y", r=4)}
    aligned = LoraModule("x", safe["x"].down.copy(), -safe["x"].up.copy(), safe["x"].scale)  # exactly −ΔW_s
    unrelated = _mod(rng, "y", r=4)
    repaired, reports = project({"x": aligned, "y": unrelated}, safe, partial(safelora_module, threshold=0.5))
    by = {r.name: r for r in reports}
    assert by["x"].similarity == pytest.approx(1.0, abs=1e-6) and not by["x"].changed
    # Safe LoRA keeps a module that lies in the alignment subspace, even one that cancels it exactly
    assert by["x"].cancellation_after == pytest.approx(1.0, rel=1e-5)
    assert by["y"].changed and by["y"].similarity < 0.5
    u = np.linalg.svd(safe["y"].delta(), full_matrices=False)[0][:, :4]
    dense = u @ u.T @ unrelated.delta()
    np.testing.assert_allclose(repaired["y"].delta(), dense, atol=1e-4)
    assert by["y"].similarity == pytest.approx(np.linalg.norm(dense) / np.linalg.norm(unrelated.delta()), rel=1e-5)


def test_every_registered_method_is_one_record():
    from auditkit.repair.methods import METHODS

    assert set(METHODS) == {"modular", "corrected", "anchored", "sign-aware", "safelora"}
    for name, m in METHODS.items():
        assert m.name == name and m.description and m.summary and callable(m.run)
    assert [n for n, m in METHODS.items() if m.needs_data] == ["modular", "corrected", "anchored"]
    assert [n for n, m in METHODS.items() if m.anchored] == ["corrected", "anchored"]  # verified on disjoint prompts


def test_auto_tries_the_cheapest_first_and_keeps_the_best_passing():
    from auditkit.repair.auto import candidates, choose, fidelity_score

    assert [m.name for m in candidates(False)] == ["sign-aware", "safelora"]
    assert [m.name for m in candidates(True)] == ["sign-aware", "safelora", "modular", "corrected", "anchored"]
    rows = [{"method": "a", "verdict": "pass", "fidelity": 0.6}, {"method": "b", "verdict": "risk", "fidelity": 0.99},
            {"method": "c", "verdict": "pass", "fidelity": 0.8}, {"method": "d", "verdict": "pass", "fidelity": None}]
    assert choose(rows)["method"] == "c"
    rows = [{"method": "a", "verdict": "risk", "fidelity": 0.9}, {"method": "b", "verdict": "inconclusive",
                                                                   "fidelity": 0.1}]
    assert choose(rows)["method"] == "b"  # none passing: the best verdict first
    assert fidelity_score({"pairs": 3, "attributes_agree": 0.5, "pixel_similarity": 0.9}) == (0.5, "attributes_agree")
    assert fidelity_score({"pairs": 3, "clip_cosine": 0.7, "pixel_similarity": 0.9}) == (0.7, "clip_cosine")
    assert fidelity_score({"pairs": 3, "pixel_similarity": 0.9}) == (0.9, "pixel_similarity")
    scored = {"pairs": 3, "attributes_agree": 0.5, "unflagged": {"pairs": 2, "attributes_agree": 1.0}}
    assert fidelity_score(scored) == (1.0, "attributes_agree (unflagged pairs)")
    assert fidelity_score({**scored, "unflagged": {"pairs": 0}}) == (0.5, "attributes_agree")
    assert fidelity_score({"pairs": 0}) == (None, None) and fidelity_score(None) == (None, None)


def test_concatenation_sums_bias_updates_and_refuses_a_dora_direction():
    from dataclasses import replace

    rng = np.random.default_rng(5)
    a = replace(_mod(rng, "a", r=2), bias=np.ones(24, np.float32))
    b = replace(_mod(rng, "a", r=3), bias=np.full(24, 2.0, np.float32))
    both = concatenate(({"a": a}, 1.0), ({"a": b}, 0.5))
    np.testing.assert_allclose(both["a"].bias, np.full(24, 2.0))
    np.testing.assert_allclose(both["a"].delta(), a.delta() + 0.5 * b.delta(), rtol=1e-5, atol=1e-5)
    assert concatenate(({"a": _mod(rng, "a")}, 1.0))["a"].bias is None
    dora = replace(_mod(rng, "a"), magnitude=np.ones(24, np.float32), magnitude_axis="out")
    with pytest.raises(ValueError, match="DoRA module"):
        concatenate(({"a": dora}, 1.0), ({"a": a}, 1.0))
