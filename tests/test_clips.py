"""Clips of video families: the detectors score sampled frames and a clip is flagged when any sampled frame is."""

import numpy as np

from auditkit.detectors import score_pixels
from auditkit.models.pipeline import sample_frames


class Brightest:
    threshold = 0.5

    def score(self, images):
        assert images.ndim == 4
        return images.reshape(len(images), -1).max(axis=1) / 255.0


def test_sampled_frames_are_evenly_spaced_with_the_first_and_the_last():
    clips = np.arange(2 * 17).reshape(2, 17, 1, 1, 1).repeat(3, axis=-1)
    assert sample_frames(clips, 4)[0, :, 0, 0, 0].tolist() == [0, 5, 11, 16]
    assert sample_frames(clips[:, :2], 4).shape[1] == 2  # never more frames than the clip has


def test_a_clip_scores_its_highest_sampled_frame():
    clips = np.zeros((3, 4, 2, 2, 3), dtype=np.uint8)
    clips[1, 2] = 255  # one frame of the second clip shows the concept
    scores = score_pixels(Brightest(), clips)
    assert scores.tolist() == [0.0, 1.0, 0.0]
    images = clips[:, 2]
    assert score_pixels(Brightest(), images).tolist() == [0.0, 1.0, 0.0]  # images score as they are
