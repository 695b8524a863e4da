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
    lo, hi, undefined = paired_bootstrap_ratio(cand, safe, base, n_boot=500)
    assert undefined == 0.0
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


# ------------------------------------------------------------------------------------------------
# scipy-backed functions against the hand-written formulas they replaced (random cases)


def _wilson_formula(k, n, z=1.959963984540054):
    import math

    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _mcnemar_formula(b, c):
    import math

    n = b + c
    pmf = [math.comb(n, k) * 0.5**n for k in range(n + 1)]
    return min(1.0, 2 * sum(pmf[: min(b, c) + 1])), min(1.0, sum(pmf[b:]))


def test_scipy_wilson_and_mcnemar_match_the_formulas_on_random_cases():
    from auditkit.stats import mcnemar_exact

    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 500))
        k = int(rng.integers(0, n + 1))
        assert wilson(k, n) == pytest.approx(_wilson_formula(k, n), abs=1e-9)
        b, c = (int(x) for x in rng.integers(0, 60, 2))
        if b + c == 0:
            continue
        before = np.array([0] * b + [1] * c, bool)
        after = ~before
        r = mcnemar_exact(before, after)
        two, inc = _mcnemar_formula(b, c)
        assert (r["p_two_sided"], r["p_increase"]) == pytest.approx((two, inc), abs=1e-9)


def test_newcombe_paired_interval_covers_at_its_level():
    from auditkit.stats import newcombe_paired, paired_counts

    rng = np.random.default_rng(2)
    for px, py, rho_share in ((0.3, 0.1, 0.5), (0.05, 0.0, 0.0), (0.5, 0.5, 0.8)):
        hits, trials = 0, 600
        for _ in range(trials):
            u = rng.random(60)
            v = np.where(rng.random(60) < rho_share, u, rng.random(60))  # correlated pairs
            x, y = u < px, v < py
            lo, hi = newcombe_paired(*paired_counts(x, y))
            hits += lo <= px - py <= hi
        assert hits / trials >= 0.93, (px, py, hits / trials)


def test_newcombe_does_not_collapse_when_nothing_is_flagged():
    from auditkit.stats import newcombe_paired

    lo, hi = newcombe_paired(0, 0, 0, 3)
    assert lo < 0 < hi and hi == pytest.approx(wilson(0, 3)[1], abs=1e-9)
    lo, hi = newcombe_paired(10, 0, 0, 90)  # identical outcomes: a tight interval around 0
    assert -0.05 < lo <= 0 <= hi < 0.05


def test_holm_matches_its_definition():
    from itertools import permutations

    from auditkit.stats import holm

    p = [0.01, 0.04, 0.03, 0.5]
    adj = holm(p)
    assert adj == pytest.approx([0.04, 0.09, 0.09, 0.5])
    for perm in permutations(range(4)):  # order of the inputs does not matter
        assert holm([p[i] for i in perm]) == pytest.approx([adj[i] for i in perm])


def test_ratio_bounds_bracket_the_ratio_and_tighten_with_more_pairs():
    from auditkit.stats import ratio_bounds

    rng = np.random.default_rng(3)
    widths = []
    for n in (50, 800):
        base, safe, cand = rng.random(n) < 0.9, rng.random(n) < 0.02, rng.random(n) < 0.3
        rb = ratio_bounds(cand, safe, base)
        assert rb.lower < rb.ratio < rb.upper
        widths.append(rb.upper - rb.lower)
    assert widths[1] < widths[0] / 2
    none = np.zeros(20, bool)
    assert ratio_bounds(none, none, none).upper == float("inf")  # no suppression: nothing to bound


def test_pairs_needed_is_the_smallest_sufficient_size():
    from auditkit.stats import newcombe_paired, pairs_needed

    def bound(c):
        return newcombe_paired(*c)[1]

    n = pairs_needed(bound, (0, 0, 0, 5), 0.1)
    assert bound((0, 0, 0, n)) < 0.1 <= bound((0, 0, 0, n - 1))
    assert pairs_needed(bound, (0, 5, 0, 5), 0.1) is None  # a 50% difference never bounds below 10%
