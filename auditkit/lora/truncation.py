"""Truncated SVD of a dense update that keeps a stated share of its energy, or a stated rank.

A full model's update is its difference to the model it was made from, ΔW = W − W₀: dense, and of
full rank in principle (an erased checkpoint's fine-tuning touches every direction a little). The
static scan and ``auditkit extract`` hold it as ΔW_k = up @ down, the smallest rank k with

    Σᵢ≤ₖ σᵢ² ≥ energy · ‖ΔW‖²_F        (or a fixed rank k),

from a randomized range finder (Halko, Martinsson & Tropp 2011, algorithm 4.4: a Gaussian sketch
Y = (ΔWΔWᵀ)^q ΔW Ω with q power iterations, Q = orth(Y), then the SVD of the small B = QᵀΔW). The
sketch grows (doubling) until it holds the stated energy; past a quarter of min(out, in) the dense
SVD is cheaper and is used instead.

The energy kept is exact, not an estimate: ΔW_k = (Q·Ũₖ)(Q·Ũₖ)ᵀ ΔW is an orthogonal projection of ΔW,
so ‖ΔW_k‖² = Σᵢ≤ₖ sᵢ² and ‖ΔW − ΔW_k‖² = ‖ΔW‖² − ‖ΔW_k‖², whatever the sketch. So the stated share
is always kept; the sketch only decides how close k is to the optimal (dense) rank. ``energy=1``
keeps every numerically non-zero direction (dense SVD): the exact reference.

Example:
    >>> rng = np.random.default_rng(0)
    >>> w = rng.normal(size=(60, 3)) @ rng.normal(size=(3, 40))  # rank 3
    >>> t = truncate(w, energy=0.99)
    >>> t.rank <= 3, t.energy_kept >= 0.99, bool(np.allclose(t.up @ t.down, w) if t.rank == 3 else True)
    (True, True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_ENERGY = 0.99
DENSE_SHARE = 0.25  # a sketch wider than this share of min(out, in): the dense SVD is cheaper
FIRST_SKETCH = 32
OVERSAMPLE = 8
POWER_ITERATIONS = 2
ZERO_RTOL = 1e-12  # energy 1: singular values below this share of the largest are rounding noise


@dataclass(frozen=True)
class Truncated:
    """ΔW_k = up @ down (up = U·S, down = Vᵀ) and what it keeps of ΔW."""

    down: np.ndarray  # k × in
    up: np.ndarray  # out × k
    energy_kept: float  # ‖ΔW_k‖² / ‖ΔW‖² (1.0 for a zero ΔW)
    total_energy: float  # ‖ΔW‖²_F
    method: str  # "randomized" or "dense"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def _check(energy: float | None, rank: int | None) -> None:
    if (energy is None) == (rank is None):
        raise ValueError("give exactly one of energy and rank")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ValueError(f"energy must lie in (0, 1], got {energy!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")


def _keep(s: np.ndarray, total: float, energy: float | None, rank: int | None) -> int:
    """How many of the descending singular values ``s`` to keep; -1 when ``s`` cannot reach ``energy``."""
    if rank is not None:
        return min(rank, int(np.sum(s > (s[0] * ZERO_RTOL if s.size else 0))))
    if energy >= 1:
        return int(np.sum(s > s[0] * ZERO_RTOL)) if s.size else 0
    cumulative = np.cumsum(s**2)
    k = int(np.searchsorted(cumulative, energy * total))  # first k with cumulative[k] >= energy·total
    return k + 1 if k < s.size else -1


def _orth(y: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(y)
    return q


def _sketch(w: np.ndarray, width: int, rng: np.random.Generator, power: int) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
    """(Q·Ũ, s, Vᵀ) of B = QᵀW for a sketch ``width`` columns wide (power iterations re-orthonormalised)."""
    q = _orth(w @ rng.standard_normal((w.shape[1], width)))
    for _ in range(power):
        q = _orth(w @ _orth(w.T @ q))
    u, s, vt = np.linalg.svd(q.T @ w, full_matrices=False)
    return q @ u, s, vt


def _result(u: np.ndarray, s: np.ndarray, vt: np.ndarray, k: int, total: float, method: str) -> Truncated:
    kept = float(np.sum(s[:k] ** 2))
    return Truncated(np.ascontiguousarray(vt[:k]), u[:, :k] * s[:k], kept / total, total, method)


def truncate(w: np.ndarray, energy: float | None = None, rank: int | None = None, seed: int = 0,
             power: int = POWER_ITERATIONS) -> Truncated:
    """The truncated SVD of ``w`` keeping ``energy`` of ‖w‖²_F (smallest such rank) or ``rank`` directions.

    Args:
        w: the dense update, out × in (conv kernels flattened).
        energy: share of ‖w‖²_F to keep, in (0, 1]; 1 keeps every non-zero direction (dense SVD).
            Default (neither given): :data:`DEFAULT_ENERGY`.
        rank: keep this many directions instead (at most the numerical rank).
        seed: the sketch's random seed (the result is deterministic for a seed).
        power: power iterations of the range finder (sharper for slowly decaying spectra).

    Returns:
        :class:`Truncated`; a zero ``w`` gives rank 0.
    """
    if energy is None and rank is None:
        energy = DEFAULT_ENERGY
    _check(energy, rank)
    w = np.asarray(w, dtype=np.float64)
    total = float(np.sum(w * w))
    if total == 0.0:
        return Truncated(np.zeros((0, w.shape[1])), np.zeros((w.shape[0], 0)), 1.0, 0.0, "dense")
    n = min(w.shape)
    rng = np.random.default_rng(seed)
    width = min(rank + OVERSAMPLE, n) if rank is not None else min(FIRST_SKETCH, n)
    while energy is None or energy < 1:
        if width > DENSE_SHARE * n:
            break
        u, s, vt = _sketch(w, width, rng, power)
        k = _keep(s, total, energy, rank)
        if k >= 0:
            return _result(u, s, vt, k, total, "randomized")
        width *= 2
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    k = _keep(s, total, energy, rank)
    return _result(u, s, vt, s.size if k < 0 else k, total, "dense")  # k < 0: rounding left the sum short
