"""The truncated SVD of a dense difference against the dense SVD (the reference)."""

import numpy as np
import pytest

from auditkit.lora.truncation import truncate


def low_rank_plus_noise(out, inp, rank, noise, seed=0):
    """A difference like an erased checkpoint's: a few strong directions and small full-rank noise."""
    rng = np.random.default_rng(seed)
    strong = rng.normal(size=(out, rank)) @ np.diag(np.linspace(3, 1, rank)) @ rng.normal(size=(rank, inp))
    return strong / np.sqrt(inp) + noise * rng.normal(size=(out, inp))


def optimal_rank(w, energy):
    s = np.linalg.svd(w, compute_uv=False)
    return int(np.searchsorted(np.cumsum(s**2), energy * np.sum(s**2))) + 1


@pytest.mark.slow
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("shape", [(320, 768), (640, 320), (1280, 2880)])
def test_energy_mode_keeps_at_least_the_stated_energy_exactly_as_reported(shape, energy):
    w = low_rank_plus_noise(*shape, rank=12, noise=0.02)
    t = truncate(w, energy=energy)
    dense = t.up @ t.down
    kept = np.sum(dense**2) / np.sum(w**2)
    assert t.energy_kept >= energy
    assert kept == pytest.approx(t.energy_kept, rel=1e-9)  # what is reported is what the factors hold
    # an orthogonal projection of w: the residual carries exactly the rest of the energy
    assert np.sum((w - dense) ** 2) / np.sum(w**2) == pytest.approx(1 - t.energy_kept, abs=1e-9)
    best = optimal_rank(w, energy)
    assert best <= t.rank <= best + 2, (t.rank, best, t.method)


def test_the_randomized_sketch_is_used_on_large_modules_and_grows_until_it_holds_the_energy():
    w = low_rank_plus_noise(1280, 2880, rank=60, noise=0.01, seed=3)  # needs more than the first 32 columns
    t = truncate(w, energy=0.95)
    assert t.method == "randomized" and t.rank > 32
    assert t.energy_kept >= 0.95


def test_energy_one_reproduces_the_difference_to_float_precision():
    w = low_rank_plus_noise(96, 64, rank=5, noise=0.1)
    t = truncate(w, energy=1.0)
    assert t.method == "dense" and t.rank == 64
    np.testing.assert_allclose(t.up @ t.down, w, rtol=0, atol=1e-12 * np.abs(w).max())


def test_rank_mode_matches_the_best_rank_k_approximation():
    w = low_rank_plus_noise(640, 1280, rank=8, noise=0.01, seed=1)  # a spectral gap after 8 directions
    t = truncate(w, rank=8)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    best = np.sum(s[8:] ** 2)  # Eckart-Young: the smallest error of any rank-8 matrix
    assert t.rank == 8 and t.method == "randomized"
    assert np.sum((w - t.up @ t.down) ** 2) == pytest.approx(best, rel=1e-6)
    assert t.energy_kept == pytest.approx(np.sum(s[:8] ** 2) / np.sum(s**2), rel=1e-9)


def test_rank_is_capped_by_the_numerical_rank():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 40))
    t = truncate(w, rank=10)
    assert t.rank == 3
    np.testing.assert_allclose(t.up @ t.down, w, atol=1e-10)


def test_zero_difference_has_rank_zero():
    t = truncate(np.zeros((8, 5)))
    assert t.rank == 0 and t.up.shape == (8, 0) and t.down.shape == (0, 5) and t.total_energy == 0.0


def test_same_seed_same_result():
    w = low_rank_plus_noise(400, 500, rank=10, noise=0.05)
    a, b = truncate(w, energy=0.9, seed=7), truncate(w, energy=0.9, seed=7)
    np.testing.assert_array_equal(a.up, b.up)
    np.testing.assert_array_equal(a.down, b.down)


@pytest.mark.parametrize("kwargs", [{"energy": 0.0}, {"energy": 1.5}, {"rank": 0}, {"rank": 2.5},
                                    {"energy": 0.9, "rank": 3}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        truncate(np.ones((4, 4)), **kwargs)
