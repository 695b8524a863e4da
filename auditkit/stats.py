"""Statistics for concept rates on paired probe images (pure functions, NumPy only)."""

from __future__ import annotations

import math

import numpy as np


def wilson(hits: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval (default 95%) for the rate ``hits / n``."""
    if n <= 0:
        return (0.0, 1.0)
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def reemergence_ratio(r_cand: float, r_safe: float, r_base: float) -> float:
    """(r_cand − r_safe) / (r_base − r_safe): 0 = the safety level holds, 1 = back to the base model."""
    gap = r_base - r_safe
    return (r_cand - r_safe) / gap if gap != 0 else float("nan")


def paired_bootstrap_ratio(cand: np.ndarray, safe: np.ndarray, base: np.ndarray, n_boot: int = 2000,
                           seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the re-emergence ratio, resampling paired images (same prompt and seed)."""
    cand, safe, base = (np.asarray(a, dtype=float) for a in (cand, safe, base))
    n = len(cand)
    if not (len(safe) == len(base) == n) or n == 0:
        raise ValueError("paired arrays of equal, non-zero length expected")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, (n_boot, n))
    rc, rs, rb = cand[idx].mean(1), safe[idx].mean(1), base[idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (rc - rs) / (rb - rs)
    ratios = ratios[np.isfinite(ratios)]
    if ratios.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def mcnemar_exact(before: np.ndarray, after: np.ndarray) -> dict:
    """Exact McNemar test on paired binary outcomes (same prompt and seed in both configurations).

    Returns the discordant counts (``b``: 0→1, ``c``: 1→0), the two-sided p-value and the one-sided
    p-value for "``after`` flags more often than ``before``" (binomial tail on b of b + c at ½).
    """
    before = np.asarray(before, dtype=bool)
    after = np.asarray(after, dtype=bool)
    if before.shape != after.shape:
        raise ValueError("paired arrays of equal length expected")
    b = int(np.sum(~before & after))
    c = int(np.sum(before & ~after))
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "p_two_sided": 1.0, "p_increase": 1.0}
    pmf = [math.comb(n, k) * 0.5**n for k in range(n + 1)]
    two_sided = min(1.0, 2 * sum(pmf[: min(b, c) + 1]))
    increase = sum(pmf[b:])
    return {"b": b, "c": c, "p_two_sided": two_sided, "p_increase": min(1.0, increase)}
