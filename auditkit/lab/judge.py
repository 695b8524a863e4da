"""A second judge of the lab's concept: geometric template matching, sharing nothing learned with the detector.

The lab's concept detector (:mod:`auditkit.lab.detector`) is a CNN trained on rendered images. A truth
measured with it shares its errors with every scan that uses it. This judge shares nothing learned: it
separates the shape from its background by colour, and matches the foreground's outline against every
world shape drawn by the world's own geometry (:func:`auditkit.lab.world._shape_mask`) over the range of
positions, sizes and angles the world samples. An image shows a cross when the best-matching template
is a cross and it matches the foreground (intersection over union at least :data:`MIN_IOU`).

How, per 32 × 32 image:

1. background colour: the median of the outermost pixel ring (shapes rarely reach it);
2. foreground: pixels whose colour lies more than half-way from the background to the most distant
   colour in the image (the 95th percentile of distances), so neon halos and anti-aliased edges do not
   decide; an image whose most distant colour is within :data:`MIN_CONTRAST` of the background has no
   foreground (``none``). The world's stripes can darken half of a shape to the background's own colour:
   then half of the shape is foreground, which the IoU threshold allows for;
3. templates: every shape of :data:`auditkit.lab.world.SHAPES` at a grid of centres, sizes and angles,
   each downsampled to 32 × 32 coverage and cut at one half; the foreground's intersection over union
   with every template is one matrix product.

Example:
    >>> from auditkit.lab import world
    >>> judge = TemplateJudge()
    >>> imgs = world.render_many(world.sample_specs(0, 4, shape=["cross", "tee"]))
    >>> judge.judge(imgs).shape.tolist() == [s.shape for s in world.sample_specs(0, 4, shape=["cross", "tee"])]
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from auditkit.lab import world

MIN_IOU = 0.35  # below: the foreground is no world shape ("none"); a striped shape can show only half
MIN_CONTRAST = 40.0  # RGB distance: a foreground this close to the background is no shape
CENTRES = np.linspace(0.40, 0.60, 6)
SIZES = np.linspace(0.50, 0.85, 8)
ANGLES = np.linspace(-15.0, 15.0, 7)


@dataclass(frozen=True)
class Judgement:
    """Per image: the best-matching shape (or ``none``), its IoU, and the best IoU of a cross."""

    shape: np.ndarray  # str, N
    iou: np.ndarray  # float, N
    cross_iou: np.ndarray  # float, N

    @property
    def is_cross(self) -> np.ndarray:
        return self.shape == "cross"


class TemplateJudge:
    """The template matcher (see the module docstring); templates are drawn once per judge."""

    name = "lab-template-judge"

    @cached_property
    def templates(self) -> tuple[np.ndarray, np.ndarray]:
        """(T × 1024 binary templates as float32, T shape indices)."""
        masks, shapes = [], []
        base = world.Spec("cross", "red")
        for k, shape in enumerate(world.SHAPES):
            for cx in CENTRES:
                for cy in CENTRES:
                    for size in SIZES:
                        for angle in ANGLES:
                            spec = dataclasses.replace(base, shape=shape, cx=float(cx), cy=float(cy),
                                                       size=float(size), angle=float(angle))
                            cover = world._downsample(world._shape_mask(spec).astype(np.float32))
                            masks.append((cover >= 0.5).reshape(-1))
                            shapes.append(k)
        return np.asarray(masks, dtype=np.float32), np.asarray(shapes)

    def foreground(self, images: np.ndarray) -> np.ndarray:
        """N × 32 × 32 boolean foreground masks of ``uint8`` RGB images (N × 32 × 32 × 3)."""
        imgs = np.asarray(images, dtype=np.float32)
        if imgs.ndim != 4 or imgs.shape[1:] != (world.SIZE, world.SIZE, 3):
            raise ValueError(f"expected N x {world.SIZE} x {world.SIZE} x 3 images, got {imgs.shape}")
        ring = np.concatenate([imgs[:, 0], imgs[:, -1], imgs[:, 1:-1, 0], imgs[:, 1:-1, -1]], axis=1)
        bg = np.median(ring, axis=1)  # N × 3
        dist = np.linalg.norm(imgs - bg[:, None, None, :], axis=-1)  # N × 32 × 32
        far = np.percentile(dist.reshape(len(imgs), -1), 95, axis=1)
        mask = dist > 0.5 * far[:, None, None]
        mask[far < MIN_CONTRAST] = False
        return mask

    def judge(self, images: np.ndarray, batch: int = 256) -> Judgement:
        """The best-matching shape of each image (``none`` below :data:`MIN_IOU` or without foreground)."""
        templates, index = self.templates
        sizes = templates.sum(axis=1)
        cross = world.SHAPES.index("cross")
        shapes, ious, cross_ious = [], [], []
        for i in range(0, len(images), batch):
            fg = self.foreground(images[i: i + batch]).reshape(-1, world.SIZE * world.SIZE).astype(np.float32)
            inter = fg @ templates.T
            area = fg.sum(axis=1, keepdims=True)
            union = area + sizes[None, :] - inter
            iou = np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)
            # ranked by F(0.5): precision (the foreground inside the template) weighs more than recall (the
            # template covered), so half a striped shape matches its own shape, not a smaller one inside it
            precision, recall = inter / np.maximum(area, 1e-9), inter / sizes[None, :]
            f = 1.25 * precision * recall / np.maximum(0.25 * precision + recall, 1e-9)
            best = f.argmax(axis=1)
            top = iou[np.arange(len(fg)), best]
            shapes += [world.SHAPES[index[b]] if t >= MIN_IOU else "none" for b, t in zip(best, top, strict=True)]
            ious.append(top)
            cross_ious.append(iou[:, index == cross].max(axis=1))
        empty = np.zeros(0, dtype=np.float32)
        return Judgement(np.asarray(shapes, dtype=object), np.concatenate(ious) if ious else empty,
                         np.concatenate(cross_ious) if cross_ious else empty)

    def flag(self, images: np.ndarray) -> np.ndarray:
        """True where an image shows a cross (the detector's ``flag`` contract)."""
        return self.judge(images).is_cross
