import numpy as np
import pytest

from auditkit.stats import paired_bootstrap_ratio, reemergence_ratio, wilson


def test_wilson_known_values():
    # reference values from the closed form (e.g. Newcombe 1998, Table I): 0/10 -> (0, 0.2775)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(81, 263)
    assert (lo, hi) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson(5, 5)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)


def test_reemergence_ratio():
    assert reemergence_ratio(0.05, 0.05, 0.5) == 0.0
    assert reemergence_ratio(0.5, 0.05, 0.5) == pytest.approx(1.0)
    assert reemergence_ratio(0.275, 0.05, 0.5) == pytest.approx(0.5)
    assert np.isnan(reemergence_ratio(0.3, 0.2, 0.2))


def test_paired_bootstrap_covers_the_point_estimate():
    rng = np.random.default_rng(0)
    base = rng.random(300) < 0.9
    safe = rng.random(300) < 0.05
    cand = rng.random(300) < 0.5
    lo, hi = paired_bootstrap_ratio(cand, safe, base, n_boot=500)
    point = reemergence_ratio(cand.mean(), safe.mean(), base.mean())
    assert lo < point < hi and hi - lo < 0.3
    with pytest.raises(ValueError):
        paired_bootstrap_ratio(cand[:3], safe, base)


def test_mcnemar_exact_matches_the_binomial_tail():
    from auditkit.stats import mcnemar_exact

    before = np.array([0] * 20 + [1] * 2 + [0] * 10, bool)
    after = np.array([1] * 20 + [0] * 2 + [0] * 10, bool)
    r = mcnemar_exact(before, after)
    assert (r["b"], r["c"]) == (20, 2)
    # two-sided exact p for 2 of 22 discordant pairs: 2 * P(X <= 2), X ~ Bin(22, 1/2)
    assert r["p_two_sided"] == pytest.approx(2 * (1 + 22 + 231) / 2**22)
    assert r["p_increase"] == pytest.approx((1 + 22 + 231) / 2**22)
    assert mcnemar_exact(after, before)["p_increase"] > 0.99
    assert mcnemar_exact(before, before) == {"b": 0, "c": 0, "p_two_sided": 1.0, "p_increase": 1.0}
    with pytest.raises(ValueError):
        mcnemar_exact(before[:3], after)
