"""Statistics for concept rates on paired probe images (pure functions).

Tests, intervals and resampling come from ``scipy.stats`` where it has them (Wilson interval,
exact binomial tail for McNemar). What scipy lacks is here, small and checked in tests against
definitions and simulations: Newcombe's interval for a difference of *paired* proportions, the
bound on the re-emergence ratio built from two of them, Holm's step-down adjustment, and the
paired bootstrap of the ratio (reported, not used by the verdict: it collapses to [0, 0] when
nothing is flagged, which is why the verdict uses the Newcombe bounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054


def wilson(hits: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (default 95%, two-sided) for the rate ``hits / n``; (0, 1) when n = 0."""
    if n <= 0:
        return (0.0, 1.0)
    from scipy import stats as _st  # imported on first use: the static scan never needs scipy (0.5 s)

    ci = _st.binomtest(int(hits), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return (max(0.0, float(ci.low)), min(1.0, float(ci.high)))


def reemergence_ratio(r_cand: float, r_safe: float, r_base: float) -> float:
    """(r_cand − r_safe) / (r_base − r_safe): 0 = the safety level holds, 1 = back to the base model."""
    gap = r_base - r_safe
    return (r_cand - r_safe) / gap if gap != 0 else float("nan")


def mcnemar_exact(before: np.ndarray, after: np.ndarray) -> dict:
    """Exact McNemar test on paired binary outcomes (same prompt and seed in both configurations).

    Returns the discordant counts (``b``: 0→1, ``c``: 1→0), the two-sided p-value and the one-sided
    p-value for "``after`` flags more often than ``before``" (binomial test of b of b + c at ½).
    """
    before = np.asarray(before, dtype=bool)
    after = np.asarray(after, dtype=bool)
    if before.shape != after.shape:
        raise ValueError("paired arrays of equal length expected")
    b = int(np.sum(~before & after))
    c = int(np.sum(before & ~after))
    if b + c == 0:
        return {"b": 0, "c": 0, "p_two_sided": 1.0, "p_increase": 1.0}
    from scipy import stats as _st

    two = _st.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    inc = _st.binomtest(b, b + c, 0.5, alternative="greater").pvalue
    return {"b": b, "c": c, "p_two_sided": min(1.0, float(two)), "p_increase": min(1.0, float(inc))}


def paired_counts(x: np.ndarray, y: np.ndarray) -> tuple[int, int, int, int]:
    """(both, x only, y only, neither) for paired binary outcomes."""
    x, y = np.asarray(x, dtype=bool), np.asarray(y, dtype=bool)
    if x.shape != y.shape:
        raise ValueError("paired arrays of equal length expected")
    return int(np.sum(x & y)), int(np.sum(x & ~y)), int(np.sum(~x & y)), int(np.sum(~x & ~y))


def newcombe_paired(both: int, x_only: int, y_only: int, neither: int, level: float = 0.95) -> tuple[float, float]:
    """Newcombe's (1998, method 10) interval for p_x − p_y from paired binary outcomes.

    With p_x = (both + x_only)/n, p_y = (both + y_only)/n and Wilson intervals (l_x, u_x), (l_y, u_y)::

        L = d − sqrt((p_x − l_x)² − 2φ(p_x − l_x)(u_y − p_y) + (u_y − p_y)²)
        U = d + sqrt((p_y − l_y)² − 2φ(p_y − l_y)(u_x − p_x) + (u_x − p_x)²)

    where φ is the (corrected) correlation of the pairs. Unlike a bootstrap it does not collapse when
    nothing is flagged: 0 of 3 pairs gives an upper bound of 0.56 for the difference.
    """
    n = both + x_only + y_only + neither
    if n <= 0:
        return (-1.0, 1.0)
    px, py = (both + x_only) / n, (both + y_only) / n
    lx, ux = wilson(both + x_only, n, level)
    ly, uy = wilson(both + y_only, n, level)
    denom = (both + x_only) * (y_only + neither) * (both + y_only) * (x_only + neither)
    cross = both * neither - x_only * y_only
    corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = corrected / math.sqrt(denom) if denom > 0 else 0.0
    d = px - py
    lo = d - math.sqrt(max(0.0, (px - lx) ** 2 - 2 * phi * (px - lx) * (uy - py) + (uy - py) ** 2))
    hi = d + math.sqrt(max(0.0, (py - ly) ** 2 - 2 * phi * (py - ly) * (ux - px) + (ux - px) ** 2))
    return (max(-1.0, lo), min(1.0, hi))


@dataclass(frozen=True)
class RatioBounds:
    """Bounds on the re-emergence ratio (r_c − r_s)/(r_b − r_s) at joint level 1 − alpha (one-sided
    Newcombe bounds at 1 − alpha/2 each for the numerator and the denominator, Bonferroni)."""

    ratio: float
    upper: float  # inf when the suppression r_b − r_s is not bounded away from 0
    lower: float
    suppression_lower: float  # lower bound of r_b − r_s


def ratio_bounds(cand: np.ndarray, safe: np.ndarray, base: np.ndarray, alpha: float = 0.05) -> RatioBounds:
    """One-sided bounds of the re-emergence ratio from paired flags (same prompt and seed)."""
    cand, safe, base = (np.asarray(a, dtype=bool) for a in (cand, safe, base))
    level = 1 - alpha  # a two-sided interval at 1 − alpha gives one-sided bounds at 1 − alpha/2
    num_lo, num_hi = newcombe_paired(*paired_counts(cand, safe), level=level)
    gap_lo, gap_hi = newcombe_paired(*paired_counts(base, safe), level=level)
    ratio = reemergence_ratio(cand.mean(), safe.mean(), base.mean())
    upper = max(num_hi, 0.0) / gap_lo if gap_lo > 0 else math.inf
    lower = num_lo / (gap_lo if num_lo < 0 else gap_hi) if gap_lo > 0 else -math.inf
    return RatioBounds(float(ratio), float(upper), float(lower), float(gap_lo))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control, any dependence)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def pairs_needed(bound, counts: tuple[int, ...], threshold: float, limit: int = 1_000_000) -> int | None:
    """The smallest number of pairs, at the observed cell proportions ``counts``, for which
    ``bound(scaled counts)`` falls below ``threshold``; None when even ``limit`` pairs would not do
    (the point estimate is at or above the threshold)."""
    n0 = sum(counts)
    if n0 == 0:
        return None

    def below(n: int) -> bool:
        scaled = [round(c * n / n0) for c in counts]
        return bound(tuple(scaled)) < threshold

    hi = n0
    while not below(hi):
        hi *= 2
        if hi > limit:
            return None
    lo = max(1, hi // 2)
    while lo < hi:  # bisection: below() is monotone in n for fixed proportions (up to rounding)
        mid = (lo + hi) // 2
        if below(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def paired_bootstrap_ratio(cand: np.ndarray, safe: np.ndarray, base: np.ndarray, n_boot: int = 2000,
                           seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Percentile interval of the re-emergence ratio, resampling paired images (same prompt and
    seed), and the share of resamples in which the ratio is undefined (r_base = r_safe there).
    scipy's ``bootstrap`` has no way to report undefined resamples, hence this function."""
    cand, safe, base = (np.asarray(a, dtype=float) for a in (cand, safe, base))
    n = len(cand)
    if not (len(safe) == len(base) == n) or n == 0:
        raise ValueError("paired arrays of equal, non-zero length expected")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, (n_boot, n))
    rc, rs, rb = cand[idx].mean(1), safe[idx].mean(1), base[idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (rc - rs) / (rb - rs)
    finite = ratios[np.isfinite(ratios)]
    undefined = 1.0 - finite.size / n_boot
    if finite.size == 0:
        return (float("nan"), float("nan"), undefined)
    lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi), undefined)
