"""Every registered detector keeps the :class:`auditkit.detectors.Detector` contract (as garak tests every probe):
a new detector is one file and one registry entry, and this module checks it without a test of its own.

Detectors whose packages are missing here are skipped, saying which; CLIP is made with a tiny random model
(its real weights are never downloaded)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from auditkit import detectors as registry
from auditkit.detectors import REGISTRY, Detector, available


def make(name: str, tmp_path_factory):
    if not available(name):
        pytest.skip(f"{name} needs {', '.join(REGISTRY[name].requires)}")
    if name == "clip":
        open_clip = pytest.importorskip("open_clip")
        from test_detectors import TINY_CLIP

        folder = tmp_path_factory.mktemp("clipcfg")
        (folder / "auditkit-contract-clip.json").write_text(json.dumps(TINY_CLIP))
        open_clip.add_model_config(folder)
        return registry.get(name, model="auditkit-contract-clip", pretrained=None, concept="cross", neutral="square")
    return registry.get(name)


@pytest.fixture(scope="module", params=sorted(REGISTRY))
def detector(request, tmp_path_factory):
    return request.param, make(request.param, tmp_path_factory)


def images(n: int, size: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_it_is_a_detector_with_a_json_profile_that_pins_its_threshold(detector):
    name, det = detector
    assert isinstance(det, Detector)
    assert isinstance(det.name, str) and det.name and isinstance(det.threshold, float)
    profile = det.profile()
    assert json.loads(json.dumps(profile)) == profile  # recorded with every result as it is
    assert profile["threshold"] == det.threshold
    assert det.profile() == profile  # deterministic: two runs compare on it


def test_scores_are_one_probability_per_image_and_flags_are_scores_at_the_threshold(detector):
    name, det = detector
    batch = images(3)
    scores = np.asarray(det.score(batch))
    assert scores.shape == (3,) and np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    flags = np.asarray(det.flag(batch))
    assert flags.dtype == bool and flags.shape == (3,)
    np.testing.assert_array_equal(flags, scores >= det.threshold)


def test_an_image_is_scored_alone_as_in_a_batch_and_any_size_is_read(detector):
    name, det = detector
    batch = images(3, seed=1)
    together = np.asarray(det.score(batch))
    alone = np.array([float(np.asarray(det.score(batch[i:i + 1]))[0]) for i in range(3)])
    np.testing.assert_allclose(alone, together, atol=1e-5)  # a run's flags do not depend on its batch size
    for size in (32, 77):
        assert np.asarray(det.score(images(2, size))).shape == (2,)


def test_a_threshold_option_moves_the_flags_and_the_profile(detector, tmp_path_factory):
    name, det = detector
    if name == "clip":
        pytest.skip("made with a tiny model above; its threshold option is tested in test_detectors")
    strict = registry.get(name, threshold=0.99)
    assert strict.threshold == 0.99 and strict.profile()["threshold"] == 0.99
    batch = images(3, seed=2)
    np.testing.assert_array_equal(np.asarray(strict.flag(batch)), np.asarray(strict.score(batch)) >= 0.99)
