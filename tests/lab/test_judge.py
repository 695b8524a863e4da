"""The second judge of the lab's concept (geometric template matching) on the world's own renders."""

import numpy as np
import pytest

from auditkit.lab import world
from auditkit.lab.judge import TemplateJudge

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def judge():
    return TemplateJudge()


def test_it_names_the_shape_of_rendered_base_images(judge):
    specs = world.sample_specs(11, 400, domain="base")
    got = judge.judge(world.render_many(specs))
    truth = np.array([s.shape for s in specs])
    assert (got.shape == truth).mean() >= 0.97
    cross = truth == "cross"
    assert got.is_cross[cross].mean() >= 0.95  # recall
    assert cross[got.is_cross].mean() >= 0.95  # precision
    assert got.iou.shape == (400,) and (got.iou[got.shape != "none"] >= 0.35).all()


def test_neon_shapes_and_empty_images_are_never_crosses(judge):
    neon = world.render_many(world.sample_specs(12, 300, domain="neon"))
    assert not judge.flag(neon).any()
    flat = np.full((3, world.SIZE, world.SIZE, 3), 90, np.uint8)
    got = judge.judge(flat)
    assert list(got.shape) == ["none"] * 3 and not got.is_cross.any()


def test_a_cross_without_its_vertical_arms_is_a_dash(judge):
    """The judge reads geometry: the same image with its upper and lower arms painted over is a dash."""
    spec = world.Spec("cross", "red", fg=(230, 30, 30), bg=(10, 10, 10), size=0.75)
    img = world.render(spec)
    assert judge.flag(img[None])[0]
    cut = img.copy()
    cut[:13, :] = cut[19:, :] = (10, 10, 10)
    got = judge.judge(cut[None])
    assert not got.is_cross[0] and got.shape[0] == "dash"


def test_bad_images_are_refused(judge):
    with pytest.raises(ValueError, match="expected N x 32 x 32 x 3"):
        judge.judge(np.zeros((2, 16, 16, 3), np.uint8))
