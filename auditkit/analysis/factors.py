"""Pure factor-space linear algebra for low-rank updates ΔW = scale · B · A.

Nothing here materialises a dense ΔW. Each update is first put in thin-SVD form from its factors:
orthonormal bases of B (out×r) and Aᵀ (in×r) from their r×r Gram matrices (a QR done with matrix
products), then an SVD of the r×r core, so ΔW = U·diag(s)·Vᵀ with
orthonormal U (out×k) and V (in×k), k ≤ r the numerical rank. Every metric between two updates
then needs only the small products Pᵢⱼ = (U_cᵀU_s)ᵢⱼ and Qᵢⱼ = (V_cᵀV_s)ᵢⱼ:

* ⟨ΔW_c, ΔW_s⟩_F = Σᵢⱼ s_c,ᵢ · Pᵢⱼ · Qᵢⱼ · s_s,ⱼ
* ‖U_sᵀ ΔW_c‖²_F = Σᵢⱼ (s_c,ᵢ Pᵢⱼ)²      (candidate energy inside the safety column space)
* ‖ΔW_c V_s‖²_F  = Σᵢⱼ (s_c,ᵢ Qᵢⱼ)²      (… inside the safety row space)
* ‖U_sᵀ ΔW_c V_s‖²_F = ‖Pᵀ diag(s_c) Q‖²_F (… inside both: the safety update's own subspace)
* principal angles between column (row) spaces: arccos of the singular values of P (Q).

Cost per module is O((out + in)·r²), against O(out·in·r) to form ΔW densely. The static scan takes
the Gram route of :func:`pair_metrics_many` (all modules at once, no n × r intermediate) and falls
back to :func:`low_rank_svd` + :func:`pair_metrics` module by module for ill-conditioned factors.
Each function is checked against a dense reference in ``tests/analysis/test_factors.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LowRankSVD:
    """ΔW = u @ diag(s) @ v.T with orthonormal columns in u and v."""

    u: np.ndarray  # out × k
    s: np.ndarray  # k, descending, all > 0
    v: np.ndarray  # in × k

    @property
    def energy(self) -> float:
        """‖ΔW‖²_F."""
        return float(np.sum(self.s**2))


DEFAULT_RTOL = 1e-6  # singular values below 1e-6·σ_max are numerical noise (fp16 factors carry ~1e-3)


def _orthonormalize(m: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """``m`` (n×r) = Q·R with orthonormal Q (n×k) and R (k×r), k the numerical rank.

    From the r×r Gram matrix: mᵀm = V·diag(λ)·Vᵀ gives R = diag(√λ)·Vᵀ and Q = m·V·diag(λ^-½),
    one more pass on Q (as in CholeskyQR2) restores orthonormality to machine precision. All
    the work is matrix products (BLAS-3), an order of magnitude faster than Householder QR for
    the tall, thin factors of a LoRA.
    """
    q, r = m, None
    for _ in range(2):
        lam, vec = np.linalg.eigh(q.T @ q)
        keep = lam > lam[-1] * rtol**2 if lam.size and lam[-1] > 0 else np.zeros(lam.size, bool)
        lam, vec = lam[keep][::-1], vec[:, keep][:, ::-1]
        root = np.sqrt(lam)
        step_r = root[:, None] * vec.T
        q = q @ (vec / root)
        r = step_r if r is None else step_r @ r
        # Orthogonality error after a pass is about eps·κ²: a well-conditioned factor needs no second pass.
        if lam.size == 0 or lam[-1] > lam[0] * 1e-4:
            break
    return q, r


def low_rank_svd(up: np.ndarray, down: np.ndarray, scale: float = 1.0, rtol: float = DEFAULT_RTOL) -> LowRankSVD:
    """Thin SVD of ``scale · up @ down`` from the factors alone.

    Args:
        up: B, out × r.
        down: A, r × in.
        scale: the LoRA scale (alpha / r).
        rtol: singular values below ``rtol · s_max`` are dropped (numerical rank).

    Example:
        >>> b, a = np.ones((3, 1)), np.ones((1, 2))
        >>> round(float(low_rank_svd(b, a).s[0]), 6)  # ‖ones(3×2)‖ = √6
        2.44949
    """
    up = np.asarray(up, dtype=np.float64)
    down = np.asarray(down, dtype=np.float64)
    qb, rb = _orthonormalize(up, rtol)
    qa, ra = _orthonormalize(down.T, rtol)
    core = scale * (rb @ ra.T)
    if core.size == 0:
        return LowRankSVD(np.zeros((up.shape[0], 0)), np.zeros(0), np.zeros((down.shape[1], 0)))
    cu, s, cvt = np.linalg.svd(core, full_matrices=False)
    keep = s > (s[0] * rtol if s[0] > 0 else np.inf)
    return LowRankSVD(u=qb @ cu[:, keep], s=s[keep], v=qa @ cvt[keep].T)


@dataclass(frozen=True)
class KronSVD:
    """The thin SVD of scale · kron(W₁, W₂) from the SVDs of its halves (LyCORIS LoKr):
    kron(U₁S₁V₁ᵀ, U₂S₂V₂ᵀ) = kron(U₁, U₂) · kron(S₁, S₂) · kron(V₁, V₂)ᵀ, columns ``keep`` of it
    (descending singular values). ``u`` and ``v`` are formed only when asked for; the cross-Gram
    matrices with another Kronecker SVD of the same split never form them (see :func:`pair_metrics`).
    """

    first: LowRankSVD
    second: LowRankSVD
    keep: np.ndarray  # indices i·k₂ + j of the kept products, by descending value
    s: np.ndarray
    sign: float = 1.0
    magnitude: float = 1.0  # |scale|

    @property
    def complete(self) -> bool:
        """Every product of the halves' singular directions kept (the usual case)."""
        return self.keep.size == self.first.s.size * self.second.s.size

    @property
    def u(self) -> np.ndarray:
        return self.sign * np.kron(self.first.u, self.second.u)[:, self.keep]

    @property
    def v(self) -> np.ndarray:
        return np.kron(self.first.v, self.second.v)[:, self.keep]

    @property
    def energy(self) -> float:
        return float(np.sum(self.s**2))

    def splits_like(self, other: KronSVD) -> bool:
        return (self.first.u.shape[0], self.first.v.shape[0]) == (other.first.u.shape[0], other.first.v.shape[0])


def kronecker_svd(up1, down1, up2, down2, scale: float = 1.0, rtol: float = DEFAULT_RTOL) -> KronSVD:
    """Thin SVD of ``scale · kron(up1 @ down1, up2 @ down2)`` from the two halves' factors.

    Example:
        >>> a, b = np.array([[2.0]]), np.array([[1.0], [0.0]])
        >>> [float(x) for x in kronecker_svd(a, np.eye(1), b, np.eye(1)).s]
        [2.0]
    """
    first, second = low_rank_svd(up1, down1, 1.0, rtol), low_rank_svd(up2, down2, 1.0, rtol)
    order, values = _kron_spectrum(first.s, second.s, scale, rtol)
    return KronSVD(first, second, order, values, -1.0 if scale < 0 else 1.0, abs(scale))


def _kron_spectrum(first: np.ndarray, second: np.ndarray, scale: float, rtol: float = DEFAULT_RTOL
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The singular values of scale·kron(W₁, W₂) from its halves' (``first``, ``second``), descending and
    cut at ``rtol`` of the largest, with their indices i·k₂ + j into the products."""
    values = abs(scale) * np.outer(first, second).ravel()
    order = np.argsort(-values, kind="stable")
    if values.size:
        order = order[values[order] > values[order[0]] * rtol]
    return order, values[order]


def update_energy(up: np.ndarray, down: np.ndarray, scale: float = 1.0) -> float:
    """‖scale·B·A‖²_F = scale²·Σᵢⱼ (BᵀB)ᵢⱼ (AAᵀ)ᵢⱼ, from the two r×r Gram matrices."""
    up = np.asarray(up, dtype=np.float64)
    down = np.asarray(down, dtype=np.float64)
    return float(scale**2 * np.sum((up.T @ up) * (down @ down.T)))


def effective_rank(s: np.ndarray) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values."""
    total = float(np.sum(s))
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


@dataclass(frozen=True)
class PairMetrics:
    """How a candidate update ΔW_c relates to a safety update ΔW_s in one module."""

    inner: float  # ⟨ΔW_c, ΔW_s⟩_F
    candidate_energy: float  # ‖ΔW_c‖²_F
    safety_energy: float  # ‖ΔW_s‖²_F
    energy_in_safety_columns: float  # ‖U_sᵀΔW_c‖² / ‖ΔW_c‖²
    energy_in_safety_rows: float  # ‖ΔW_c V_s‖² / ‖ΔW_c‖²
    energy_in_safety_subspace: float  # ‖U_sᵀΔW_c V_s‖² / ‖ΔW_c‖²
    column_angles: np.ndarray  # principal angles (radians), ascending
    row_angles: np.ndarray

    @property
    def cancellation(self) -> float:
        """−⟨ΔW_c, ΔW_s⟩ / ‖ΔW_s‖²: 1.0 means ΔW_c exactly undoes ΔW_s along its direction."""
        return -self.inner / self.safety_energy if self.safety_energy > 0 else 0.0

    @property
    def cosine(self) -> float:
        denom = np.sqrt(self.candidate_energy * self.safety_energy)
        return float(self.inner / denom) if denom > 0 else 0.0


def _cross(cand, safe) -> tuple[np.ndarray, np.ndarray]:
    """P = U_cᵀU_s and Q = V_cᵀV_s; for two Kronecker SVDs of one split, from the halves alone:
    kron(A₁, A₂)ᵀ kron(B₁, B₂) = kron(A₁ᵀB₁, A₂ᵀB₂)."""
    if isinstance(cand, KronSVD) and isinstance(safe, KronSVD) and cand.splits_like(safe):
        p = np.kron(cand.first.u.T @ safe.first.u, cand.second.u.T @ safe.second.u)
        q = np.kron(cand.first.v.T @ safe.first.v, cand.second.v.T @ safe.second.v)
        sel = np.ix_(cand.keep, safe.keep)
        return cand.sign * safe.sign * p[sel], q[sel]
    return cand.u.T @ safe.u, cand.v.T @ safe.v


def _kron_angles(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Principal angles of two Kronecker-product subspaces from the halves' angles: the cosines
    multiply; ``n`` = min of the two dimensions (the remaining cosines are 0)."""
    cos = np.sort(np.outer(np.cos(a), np.cos(b)).ravel())[::-1][:n]
    return np.arccos(np.clip(np.concatenate([cos, np.zeros(n - cos.size)]), -1.0, 1.0))


def _kron_combine(one: PairMetrics, two: PairMetrics, scale_c: float, scale_s: float, n: int) -> PairMetrics:
    """The metrics of scale_c·kron(C₁, C₂) against scale_s·kron(S₁, S₂) from the halves' metrics
    (``one``: C₁ vs S₁, ``two``: C₂ vs S₂; ``n`` = the smaller of the two updates' ranks):
    ⟨A⊗B, C⊗D⟩ = ⟨A,C⟩⟨B,D⟩, ‖A⊗B‖² = ‖A‖²‖B‖², projections onto Kronecker subspaces multiply."""
    return PairMetrics(
        inner=scale_c * scale_s * one.inner * two.inner,
        candidate_energy=scale_c**2 * one.candidate_energy * two.candidate_energy,
        safety_energy=scale_s**2 * one.safety_energy * two.safety_energy,
        energy_in_safety_columns=one.energy_in_safety_columns * two.energy_in_safety_columns,
        energy_in_safety_rows=one.energy_in_safety_rows * two.energy_in_safety_rows,
        energy_in_safety_subspace=one.energy_in_safety_subspace * two.energy_in_safety_subspace,
        column_angles=_kron_angles(one.column_angles, two.column_angles, n),
        row_angles=_kron_angles(one.row_angles, two.row_angles, n),
    )


def _kron_pair_metrics(cand: KronSVD, safe: KronSVD) -> PairMetrics:
    """pair_metrics of two complete Kronecker SVDs of one split, from the halves' metrics."""
    return _kron_combine(pair_metrics(cand.first, safe.first), pair_metrics(cand.second, safe.second),
                         cand.sign * cand.magnitude, safe.sign * safe.magnitude, min(cand.s.size, safe.s.size))


def pair_metrics(cand: LowRankSVD | KronSVD, safe: LowRankSVD | KronSVD) -> PairMetrics:
    """All candidate-vs-safety metrics of one module from the two thin SVDs."""
    if (isinstance(cand, KronSVD) and isinstance(safe, KronSVD) and cand.splits_like(safe)
            and cand.complete and safe.complete):
        return _kron_pair_metrics(cand, safe)
    p, q = _cross(cand, safe)  # k_c × k_s
    inner = float(np.sum((cand.s[:, None] * p * q) * safe.s[None, :]))
    ce = cand.energy
    sp = cand.s[:, None] * p
    sq = cand.s[:, None] * q
    both = p.T @ (cand.s[:, None] * q)

    def frac(x: float) -> float:
        return float(x / ce) if ce > 0 else 0.0

    return PairMetrics(
        inner=inner,
        candidate_energy=ce,
        safety_energy=safe.energy,
        energy_in_safety_columns=frac(np.sum(sp**2)),
        energy_in_safety_rows=frac(np.sum(sq**2)),
        energy_in_safety_subspace=frac(np.sum(both**2)),
        column_angles=principal_angles(p),
        row_angles=principal_angles(q),
    )


# --- many modules at once, from Gram matrices ----------------------------------------------------
#
# For well-conditioned factors (the usual case) nothing of size out × r is needed beyond three
# products per side. With the Cholesky factor Bᵀ B = L Lᵀ, Q = B·L⁻ᵀ is an orthonormal basis of B's
# columns and B = Q·Lᵀ, so ΔW = scale·B·A = Q_b·M·Q_aᵀ with the r × r core M = scale·L_bᵀ·L_a, and
# the two updates' bases meet in P = Q_b,cᵀ Q_b,s = L_b,c⁻¹ (B_cᵀ B_s) L_b,s⁻ᵀ (and Q for the rows).
# Every metric is a function of M_c, M_s, P and Q (the metrics only need orthonormal bases of the
# column and row spaces, not singular ones; ranks and effective ranks need the cores' singular
# values). Every r × r step runs stacked over all modules of one rank pair: a module costs its six
# n × r products and no Python per small matrix.

# A factor is taken by the Gram route when its Gram matrix provably has κ₂ < 1e6, so the squared
# conditioning costs at most ~1e-10 relative accuracy; κ₂(G) ≤ tr(G)·‖L⁻¹‖²_F (≤ r²·κ₂(G)) costs
# one triangular inverse, which the route needs anyway.
MAX_GRAM_CONDITION = 1e6


@dataclass(frozen=True)
class FactorPair:
    """One module's two updates: ``scale · up @ down`` for the candidate (c) and the safety (s)."""

    up_c: np.ndarray
    down_c: np.ndarray
    scale_c: float
    up_s: np.ndarray
    down_s: np.ndarray
    scale_s: float


def _grams(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xᵀx, yᵀy and xᵀy in float64 (x, y: n × r)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return x.T @ x, y.T @ y, x.T @ y


def _cholesky_inverse(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stacked Gram matrices -> (lower Cholesky factors L, their inverses, well-conditioned?). Singular
    and ill-conditioned ones are marked (their results are discarded)."""
    eye = np.eye(gram.shape[-1])
    try:
        low = np.linalg.cholesky(gram)
    except np.linalg.LinAlgError:  # a singular one stops the stacked call: factor one by one
        low = np.empty_like(gram)
        for i, g in enumerate(gram):
            try:
                low[i] = np.linalg.cholesky(g)
            except np.linalg.LinAlgError:
                low[i] = np.nan
    ok = np.all(np.isfinite(low), axis=(1, 2))
    low = np.where(ok[:, None, None], low, eye)
    inv = np.linalg.inv(low)
    bound = np.trace(gram, axis1=1, axis2=2) * np.sum(inv**2, axis=(1, 2))
    return low, inv, ok & (bound < MAX_GRAM_CONDITION)


def _t(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, 1, 2)


def pair_metrics_many(pairs: list[FactorPair]) -> list[tuple[PairMetrics, np.ndarray, np.ndarray] | None]:
    """:func:`pair_metrics` (with both updates' singular values) for many modules at once.

    Entries are ``None`` where a factor is ill-conditioned (numerically rank deficient included):
    compute those with :func:`low_rank_svd` and :func:`pair_metrics`, which handle any numerical rank.
    """
    out: list = [None] * len(pairs)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault((p.down_c.shape[0], p.down_s.shape[0]), []).append(i)
    for idx in groups.values():
        cols = [_grams(pairs[i].up_c, pairs[i].up_s) for i in idx]
        rows = [_grams(pairs[i].down_c.T, pairs[i].down_s.T) for i in idx]
        (lbc, ibc, ok1), (lbs, ibs, ok2) = (_cholesky_inverse(np.stack([g[k] for g in cols])) for k in (0, 1))
        (lac, iac, ok3), (las, ias, ok4) = (_cholesky_inverse(np.stack([g[k] for g in rows])) for k in (0, 1))
        ok = ok1 & ok2 & ok3 & ok4
        scale_c = np.array([pairs[i].scale_c for i in idx], dtype=np.float64)[:, None, None]
        scale_s = np.array([pairs[i].scale_s for i in idx], dtype=np.float64)[:, None, None]
        m_c, m_s = scale_c * (_t(lbc) @ lac), scale_s * (_t(lbs) @ las)
        p = ibc @ np.stack([g[2] for g in cols]) @ _t(ibs)
        q = iac @ np.stack([g[2] for g in rows]) @ _t(ias)
        inner = np.sum(m_c * (p @ m_s @ _t(q)), axis=(1, 2))
        ce, se = np.sum(m_c**2, axis=(1, 2)), np.sum(m_s**2, axis=(1, 2))
        in_cols = np.sum((_t(p) @ m_c) ** 2, axis=(1, 2))
        in_rows = np.sum((m_c @ q) ** 2, axis=(1, 2))
        in_both = np.sum((_t(p) @ m_c @ q) ** 2, axis=(1, 2))
        s_c, s_s = np.linalg.svd(m_c, compute_uv=False), np.linalg.svd(m_s, compute_uv=False)
        for sv in (s_c, s_s):  # a zero scale: numerical rank 0, left to the one-by-one route
            ok &= (sv[:, 0] > 0) & (sv[:, -1] > sv[:, 0] * DEFAULT_RTOL)
        col_cos, row_cos = np.linalg.svd(p, compute_uv=False), np.linalg.svd(q, compute_uv=False)
        for j, i in enumerate(idx):
            if not ok[j]:
                continue
            frac = 1.0 / ce[j] if ce[j] > 0 else 0.0
            out[i] = (PairMetrics(
                inner=float(inner[j]), candidate_energy=float(ce[j]), safety_energy=float(se[j]),
                energy_in_safety_columns=float(in_cols[j] * frac), energy_in_safety_rows=float(in_rows[j] * frac),
                energy_in_safety_subspace=float(in_both[j] * frac),
                column_angles=np.arccos(np.clip(col_cos[j], -1.0, 1.0)),
                row_angles=np.arccos(np.clip(row_cos[j], -1.0, 1.0))), s_c[j], s_s[j])
    return out


def principal_angles(cross: np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) from the cross-Gram matrix of two orthonormal bases."""
    if cross.size == 0:
        return np.zeros(0)
    cos = np.linalg.svd(cross, compute_uv=False)
    return np.arccos(np.clip(cos, -1.0, 1.0))


def _kron_values(first: np.ndarray, second: np.ndarray, scale: float) -> np.ndarray | None:
    """The singular values of scale·kron(W₁, W₂), descending, or None when some fall below the
    numerical-rank cut (the update is then not *complete*: see :class:`KronSVD`)."""
    _, values = _kron_spectrum(first, second, scale)
    return values if values.size and values.size == first.size * second.size else None


def kron_pair_metrics_many(pairs: list[tuple[tuple, float, tuple, float]]
                           ) -> list[tuple[PairMetrics, np.ndarray, np.ndarray] | None]:
    """:func:`pair_metrics_many` for LoKr updates of one split each: ``(halves_c, scale_c, halves_s,
    scale_s)`` with halves ``(up₁, down₁, up₂, down₂)``; both halves of every module go through the
    Gram route together. ``None`` where a half is ill-conditioned or a product falls below the rank cut."""
    first = pair_metrics_many([FactorPair(c[0], c[1], 1.0, s[0], s[1], 1.0) for c, _, s, _ in pairs])
    second = pair_metrics_many([FactorPair(c[2], c[3], 1.0, s[2], s[3], 1.0) for c, _, s, _ in pairs])
    out: list = []
    for (_, scale_c, _, scale_s), one, two in zip(pairs, first, second, strict=True):
        values = None if one is None or two is None else (
            _kron_values(one[1], two[1], scale_c), _kron_values(one[2], two[2], scale_s))
        if values is None or values[0] is None or values[1] is None:
            out.append(None)
            continue
        out.append((_kron_combine(one[0], two[0], scale_c, scale_s, min(values[0].size, values[1].size)),
                    *values))
    return out
