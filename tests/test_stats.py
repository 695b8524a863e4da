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
