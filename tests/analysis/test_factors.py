"""Every factor-space metric equals its dense reference on random matrices."""

import numpy as np
import pytest

from auditkit.analysis.factors import (
    FactorPair,
    effective_rank,
    low_rank_svd,
    pair_metrics,
    pair_metrics_many,
    update_energy,
)


def dense_orthonormal(w, tol=1e-10):
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    k = int(np.sum(s > tol * s[0]))
    return u[:, :k], s[:k], vt[:k].T


def dense_reference(wc, ws):
    uc, sc, vc = dense_orthonormal(wc)
    us, ss, vs = dense_orthonormal(ws)
    ce = np.sum(wc**2)
    cos_cols = np.linalg.svd(uc.T @ us, compute_uv=False)
    cos_rows = np.linalg.svd(vc.T @ vs, compute_uv=False)
    return {
        "inner": np.sum(wc * ws),
        "candidate_energy": ce,
        "safety_energy": np.sum(ws**2),
        "cols": np.sum((us.T @ wc) ** 2) / ce,
        "rows": np.sum((wc @ vs) ** 2) / ce,
        "both": np.sum((us.T @ wc @ vs) ** 2) / ce,
        "col_angles": np.sort(np.arccos(np.clip(cos_cols, -1, 1))),
        "row_angles": np.sort(np.arccos(np.clip(cos_rows, -1, 1))),
    }


def assert_matches_dense(pm, ref):
    assert pm.inner == pytest.approx(ref["inner"], rel=1e-9, abs=1e-9)
    assert pm.candidate_energy == pytest.approx(ref["candidate_energy"], rel=1e-10)
    assert pm.safety_energy == pytest.approx(ref["safety_energy"], rel=1e-10)
    assert pm.energy_in_safety_columns == pytest.approx(ref["cols"], rel=1e-8)
    assert pm.energy_in_safety_rows == pytest.approx(ref["rows"], rel=1e-8)
    assert pm.energy_in_safety_subspace == pytest.approx(ref["both"], rel=1e-8)
    assert pm.cancellation == pytest.approx(-ref["inner"] / ref["safety_energy"], rel=1e-9)
    assert pm.cosine == pytest.approx(ref["inner"] / np.sqrt(ref["candidate_energy"] * ref["safety_energy"]))
    # angles ascending in both; as many as the smaller rank
    np.testing.assert_allclose(pm.column_angles, ref["col_angles"], atol=1e-6)
    np.testing.assert_allclose(pm.row_angles, ref["row_angles"], atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(40, 30, 4, 6), (64, 16, 8, 3), (20, 50, 2, 2)])
def test_pair_metrics_match_dense_reference(seed, shape):
    out, inp, rc, rs = shape
    rng = np.random.default_rng(seed)
    bs, as_ = rng.normal(size=(out, rs)), rng.normal(size=(rs, inp))
    # a candidate sharing part of the safety subspace, so the metrics are not trivially zero
    bc = np.concatenate([-0.7 * bs[:, :1], rng.normal(size=(out, rc - 1))], axis=1)
    ac = np.concatenate([as_[:1], rng.normal(size=(rc - 1, inp))])
    sc_, ss_ = 0.5, 2.0
    wc, ws = sc_ * bc @ ac, ss_ * bs @ as_
    ref = dense_reference(wc, ws)
    pm = pair_metrics(low_rank_svd(bc, ac, sc_), low_rank_svd(bs, as_, ss_))
    assert_matches_dense(pm, ref)


def test_low_rank_svd_reconstructs_and_finds_numerical_rank():
    rng = np.random.default_rng(1)
    b = rng.normal(size=(30, 5))
    a = rng.normal(size=(5, 20))
    b[:, 4] = b[:, 0]  # rank-deficient factor: true rank 4
    a[4] = a[0]
    svd = low_rank_svd(b, a, 0.25)
    assert svd.s.size == 4
    np.testing.assert_allclose(svd.u @ np.diag(svd.s) @ svd.v.T, 0.25 * b @ a, atol=1e-10)
    np.testing.assert_allclose(svd.s, np.linalg.svd(0.25 * b @ a, compute_uv=False)[:4], rtol=1e-10)


def test_zero_update_has_rank_zero_and_no_energy():
    svd = low_rank_svd(np.zeros((6, 2)), np.ones((2, 5)))
    assert svd.s.size == 0 and svd.energy == 0.0


def test_exact_inverse_cancels_fully_and_orthogonal_not_at_all():
    rng = np.random.default_rng(2)
    bs, as_ = rng.normal(size=(50, 3)), rng.normal(size=(3, 40))
    safe = low_rank_svd(bs, as_)
    assert pair_metrics(low_rank_svd(-bs, as_), safe).cancellation == pytest.approx(1.0)
    # orthogonal: columns orthogonal to the safety column space
    q, _ = np.linalg.qr(np.concatenate([bs, rng.normal(size=(50, 3))], axis=1))
    ortho = low_rank_svd(q[:, 3:], rng.normal(size=(3, 40)))
    pm = pair_metrics(ortho, safe)
    assert abs(pm.cancellation) < 1e-12 and pm.energy_in_safety_columns < 1e-20


def test_effective_rank_bounds():
    assert effective_rank(np.ones(7)) == pytest.approx(7.0)
    assert effective_rank(np.array([1.0, 0, 0])) == pytest.approx(1.0)
    assert 1.0 < effective_rank(np.array([3.0, 1.0])) < 2.0
    assert effective_rank(np.zeros(3)) == 0.0


def test_update_energy_matches_dense_norm():
    rng = np.random.default_rng(7)
    b, a = rng.normal(size=(33, 5)), rng.normal(size=(5, 17))
    assert update_energy(b, a, 0.3) == pytest.approx(np.sum((0.3 * b @ a) ** 2), rel=1e-12)
    assert update_energy(b, a, 0.3) == pytest.approx(low_rank_svd(b, a, 0.3).energy, rel=1e-10)


def _kron_factors(rng, shape1, shape2, r2):
    """(up1, down1, up2, down2): a whole first half (split by an identity) and a rank-r2 second half."""
    w1 = rng.normal(size=shape1)
    return w1, np.eye(shape1[1]), rng.normal(size=(shape2[0], r2)), rng.normal(size=(r2, shape2[1]))


def test_kronecker_svd_is_the_svd_of_the_kronecker_product():
    from auditkit.analysis.factors import kronecker_svd

    rng = np.random.default_rng(7)
    u1, d1, u2, d2 = _kron_factors(rng, (4, 5), (8, 6), 3)
    dense = -0.7 * np.kron(u1 @ d1, u2 @ d2)
    k = kronecker_svd(u1, d1, u2, d2, scale=-0.7)
    np.testing.assert_allclose(k.u @ np.diag(k.s) @ k.v.T, dense, atol=1e-10)
    np.testing.assert_allclose(k.s, np.linalg.svd(dense, compute_uv=False)[: k.s.size], rtol=1e-9)
    assert k.s.size == 4 * 3 and k.energy == pytest.approx(np.sum(dense**2))
    np.testing.assert_allclose(k.u.T @ k.u, np.eye(k.s.size), atol=1e-10)


@pytest.mark.parametrize("same_split", [True, False])
def test_pair_metrics_of_kronecker_updates_match_dense(same_split):
    from auditkit.analysis.factors import kronecker_svd

    rng = np.random.default_rng(8)
    c = _kron_factors(rng, (4, 5), (8, 6), 3)
    s = _kron_factors(rng, (4, 5), (8, 6), 2) if same_split else _kron_factors(rng, (2, 3), (16, 10), 2)
    wc, ws = 0.5 * np.kron(c[0] @ c[1], c[2] @ c[3]), 2.0 * np.kron(s[0] @ s[1], s[2] @ s[3])
    pm = pair_metrics(kronecker_svd(*c, scale=0.5), kronecker_svd(*s, scale=2.0))
    assert pm.inner == pytest.approx(np.sum(wc * ws), rel=1e-9)
    us, ss, vts = np.linalg.svd(ws, full_matrices=False)
    k = int(np.sum(ss > ss[0] * 1e-9))
    want = np.sum((us[:, :k].T @ wc @ vts[:k].T) ** 2) / np.sum(wc**2)
    assert pm.energy_in_safety_subspace == pytest.approx(want, rel=1e-8)
    uc = np.linalg.svd(wc, full_matrices=False)[0][:, : int(np.sum(np.linalg.svd(wc, compute_uv=False) > 1e-9))]
    cos = np.linalg.svd(uc.T @ us[:, :k], compute_uv=False)
    np.testing.assert_allclose(np.sort(np.cos(pm.column_angles))[::-1][: cos.size], cos, atol=1e-8)
    # a LoRA safety update against a Kronecker candidate goes through the dense-free general path too
    lora = low_rank_svd(rng.normal(size=(32, 2)), rng.normal(size=(2, 30)))
    pm2 = pair_metrics(kronecker_svd(*c, scale=0.5), lora)
    assert pm2.inner == pytest.approx(np.sum(wc * ((lora.u * lora.s) @ lora.v.T)), rel=1e-9)


def _pair(rng, out, inp, rc, rs, overlap=0.7):
    bs, as_ = rng.normal(size=(out, rs)), rng.normal(size=(rs, inp))
    bc = np.concatenate([-overlap * bs[:, :1], rng.normal(size=(out, rc - 1))], axis=1)
    ac = np.concatenate([as_[:1], rng.normal(size=(rc - 1, inp))])
    return FactorPair(bc, ac, float(rng.uniform(-2, 2)), bs, as_, float(rng.uniform(0.1, 2)))


def test_pair_metrics_many_match_dense_reference_and_the_one_by_one_route():
    rng = np.random.default_rng(7)
    shapes = [(40, 30, 4, 6), (64, 16, 8, 3), (20, 50, 2, 2), (40, 30, 4, 6), (33, 33, 8, 3), (20, 50, 2, 2)]
    pairs = [_pair(rng, *s) for s in shapes]
    pairs[1] = FactorPair(pairs[1].up_c.astype(np.float16), pairs[1].down_c.astype(np.float16), pairs[1].scale_c,
                          pairs[1].up_s, pairs[1].down_s, pairs[1].scale_s)  # fp16 factors, as files hold them
    found = pair_metrics_many(pairs)
    for p, got in zip(pairs, found, strict=True):
        assert got is not None
        pm, s_c, s_s = got
        wc = p.scale_c * p.up_c.astype(np.float64) @ p.down_c.astype(np.float64)
        ws = p.scale_s * p.up_s @ p.down_s
        ref = dense_reference(wc, ws)
        assert_matches_dense(pm, ref)
        one_c = low_rank_svd(p.up_c, p.down_c, p.scale_c)
        np.testing.assert_allclose(s_c, one_c.s, rtol=1e-9)
        np.testing.assert_allclose(s_s, np.linalg.svd(ws, compute_uv=False)[: s_s.size], rtol=1e-9)


def test_pair_metrics_many_leaves_ill_conditioned_and_zero_updates_to_the_one_by_one_route():
    rng = np.random.default_rng(3)
    good, deficient, scaled_out, near = (_pair(rng, 40, 30, 4, 6) for _ in range(4))
    deficient = FactorPair(np.concatenate([deficient.up_c[:, :3], deficient.up_c[:, :1]], axis=1),
                           deficient.down_c, 1.0, deficient.up_s, deficient.down_s, 1.0)
    scaled_out = FactorPair(scaled_out.up_c, scaled_out.down_c, 0.0, scaled_out.up_s, scaled_out.down_s, 1.0)
    down = near.down_s.copy()
    down[1] = down[0] + 1e-4 * down[1]  # κ(A) ~ 1e4: its Gram is past the well-conditioned bound
    near = FactorPair(near.up_c, near.down_c, 1.0, near.up_s, down, 1.0)
    found = pair_metrics_many([good, deficient, scaled_out, near])
    assert found[0] is not None and found[1:] == [None, None, None]


def test_kron_pair_metrics_many_match_dense_and_the_one_by_one_route():
    from auditkit.analysis.factors import kron_pair_metrics_many, kronecker_svd

    def halves(*args):  # a whole first half split by its SVD, as auditkit.lora.algorithms reads it
        w1, eye, u2, d2 = _kron_factors(rng, *args)
        u, s, vt = np.linalg.svd(w1 @ eye, full_matrices=False)
        return u * s, vt, u2, d2

    rng = np.random.default_rng(9)
    mods = [(halves((4, 5), (8, 6), 3), -0.5, halves((4, 5), (8, 6), 2), 2.0) for _ in range(3)]
    mods.append((halves((2, 3), (16, 10), 4), 1.5, halves((2, 3), (16, 10), 4), 0.25))
    found = kron_pair_metrics_many(mods)
    for (c, sc, s, ss), got in zip(mods, found, strict=True):
        assert got is not None
        pm, s_c, s_s = got
        wc, ws = sc * np.kron(c[0] @ c[1], c[2] @ c[3]), ss * np.kron(s[0] @ s[1], s[2] @ s[3])
        ref = dense_reference(wc, ws)
        assert pm.inner == pytest.approx(ref["inner"], rel=1e-9)
        assert pm.candidate_energy == pytest.approx(ref["candidate_energy"], rel=1e-10)
        assert pm.energy_in_safety_columns == pytest.approx(ref["cols"], rel=1e-8)
        assert pm.energy_in_safety_rows == pytest.approx(ref["rows"], rel=1e-8)
        assert pm.energy_in_safety_subspace == pytest.approx(ref["both"], rel=1e-8)
        np.testing.assert_allclose(s_c, np.linalg.svd(wc, compute_uv=False)[: s_c.size], rtol=1e-9)
        np.testing.assert_allclose(s_s, kronecker_svd(*s, scale=ss).s, rtol=1e-9)
        one = pair_metrics(kronecker_svd(*c, scale=sc), kronecker_svd(*s, scale=ss))
        np.testing.assert_allclose(pm.column_angles, one.column_angles, atol=1e-9)
        np.testing.assert_allclose(pm.row_angles, one.row_angles, atol=1e-9)
    # a zero scale, and a whole half held with more columns than rows (singular Gram): one by one
    assert kron_pair_metrics_many([(mods[0][0], 0.0, mods[0][2], 1.0)]) == [None]
    unsplit = _kron_factors(rng, (4, 5), (8, 6), 3)
    assert kron_pair_metrics_many([(unsplit, 1.0, mods[0][2], 1.0)]) == [None]
