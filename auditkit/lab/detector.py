"""The lab's concept detector: a small CNN that classifies a lab image's shape, colour and style.

It scores an image for a concept of :data:`auditkit.lab.world.CONCEPTS` as the probability of the
concept's shape classes (``cross`` -> P(shape = cross)). Besides the concept score it gives per-class
probabilities, so fidelity on the benign domain ("is this neon tee still a tee?") and collateral
damage to colours can be measured with the same model.

The interface is the one every auditkit detector has: ``name``, ``threshold``, ``profile()`` (what
was pinned: weights sha256, threshold, classes), ``score(images) -> float array in [0, 1]``
(1 = concept present) and ``flag(images) = score >= threshold``.

Weights are safetensors (never pickle) plus a JSON config, in ``auditkit/lab/assets/detector``.
They are trained by ``scripts/train_lab.py`` on rendered world images with noise, blur, colour
jitter, shifts and round trips through the lab VAE, so that they transfer to generated images.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from auditkit.lab.world import BLOB, COLOURS, CONCEPTS, SHAPES, SIZE

SHAPE_CLASSES: tuple[str, ...] = SHAPES + ("none",)  # "none": blobs and empty backgrounds
COLOUR_CLASSES: tuple[str, ...] = tuple(COLOURS)
STYLE_CLASSES: tuple[str, ...] = ("solid", "striped", "neon")
HEADS: dict[str, tuple[str, ...]] = {
    "shape": SHAPE_CLASSES, "colour": COLOUR_CLASSES, "style": STYLE_CLASSES}
WEIGHTS_FILE = "detector.safetensors"
CONFIG_FILE = "config.json"


def shape_label(shape: str) -> int:
    return SHAPE_CLASSES.index("none" if shape == BLOB else shape)


def build_network(width: int = 32):
    """The CNN: three conv stages (32 -> 16 -> 8 -> 4 px) and one linear head per attribute."""
    import torch
    from torch import nn

    class LabShapeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = width

            def stage(cin: int, cout: int) -> nn.Sequential:
                return nn.Sequential(
                    nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.MaxPool2d(2))

            self.features = nn.Sequential(stage(3, w), stage(w, 2 * w), stage(2 * w, 2 * w))
            self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, 128), nn.ReLU(),
                                       nn.Dropout(0.2))
            self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in HEADS.items()})

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = self.trunk(self.features(x))
            return {k: head(h) for k, head in self.heads.items()}

    return LabShapeNet()


def to_tensor(images: Any):
    """PIL images / ``N x H x W x 3`` arrays (uint8, or floats in [0, 1]) -> float tensor in [-1, 1].

    Images of another size are resized to 32x32 (box filter), as the detector was trained there.
    """
    import torch
    from PIL import Image

    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    if isinstance(images, Image.Image):
        images = [images]
    arrays = []
    for im in images:
        if isinstance(im, Image.Image):
            im = im.convert("RGB")
            if im.size != (SIZE, SIZE):
                im = im.resize((SIZE, SIZE), Image.BOX)
            a = np.asarray(im, dtype=np.float32) / 255.0
        else:
            a = np.asarray(im)
            a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
            if a.shape[:2] != (SIZE, SIZE):
                u8 = np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8)
                a = np.asarray(Image.fromarray(u8).resize((SIZE, SIZE), Image.BOX), np.float32) / 255
        arrays.append(a)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x * 2 - 1


def detector_assets_path() -> Path:
    return Path(str(resources.files("auditkit.lab").joinpath("assets").joinpath("detector")))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class LabConceptDetector:
    """Scores lab images for a concept (default ``cross``) with the shipped shape CNN.

    Args:
        concept: a key of :data:`auditkit.lab.world.CONCEPTS`.
        threshold: score at or above which an image is flagged (default: the shipped config's).
        path: folder with ``detector.safetensors`` and ``config.json`` (default: shipped assets).
        batch_size: images per forward pass.

    Example:
        >>> from auditkit.lab import world
        >>> det = LabConceptDetector()  # doctest: +SKIP
        >>> imgs = world.render_many(world.sample_specs(0, 4, shape="cross"))  # doctest: +SKIP
        >>> det.flag(imgs).all()  # doctest: +SKIP
        True
    """

    def __init__(self, concept: str = "cross", threshold: float | None = None,
                 path: str | Path | None = None, batch_size: int = 256) -> None:
        import torch
        from safetensors.torch import load_file

        if concept not in CONCEPTS:
            raise KeyError(f"unknown concept {concept!r}; known: {sorted(CONCEPTS)}")
        self.path = Path(path) if path is not None else detector_assets_path()
        weights = self.path / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"no detector weights at {weights}; run scripts/train_lab.py")
        self.config = json.loads((self.path / CONFIG_FILE).read_text())
        if tuple(self.config["heads"]["shape"]) != SHAPE_CLASSES:
            raise ValueError("detector classes do not match this version of the lab world")
        self.concept = concept
        self.name = f"lab-{concept}"
        self.threshold = float(self.config["threshold"] if threshold is None else threshold)
        self.batch_size = batch_size
        self.weights_sha256 = sha256_file(weights)
        self._positive = [SHAPE_CLASSES.index(s) for s in CONCEPTS[concept].shapes]
        self._net = build_network(self.config.get("width", 32))
        self._net.load_state_dict(load_file(str(weights)))
        self._net.eval()
        self._torch = torch

    def profile(self) -> dict[str, Any]:
        """What this detector's results depend on, for the run log."""
        return {
            "name": self.name,
            "kind": "auditkit.lab.detector.LabConceptDetector",
            "concept": self.concept,
            "positive_classes": list(CONCEPTS[self.concept].shapes),
            "threshold": self.threshold,
            "classes": {k: list(v) for k, v in HEADS.items()},
            "weights_sha256": self.weights_sha256,
            "input_size": [SIZE, SIZE],
            "trained": self.config.get("trained", {}),
        }

    def probabilities(self, images: Any) -> dict[str, np.ndarray]:
        """Per-head class probabilities: ``{"shape": N x 9, "colour": N x 6, "style": N x 3}``;
        column order is :data:`HEADS`."""
        torch = self._torch
        x = to_tensor(images)
        out: dict[str, list[np.ndarray]] = {k: [] for k in HEADS}
        with torch.no_grad():
            for i in range(0, len(x), self.batch_size):
                logits = self._net(x[i: i + self.batch_size])
                for k, v in logits.items():
                    out[k].append(torch.softmax(v.float(), dim=-1).numpy())
        return {k: np.concatenate(v) if v else np.zeros((0, len(HEADS[k]))) for k, v in out.items()}

    def predict(self, images: Any) -> list[dict[str, str]]:
        """Most likely class per head for each image, e.g. ``{"shape": "tee", "colour": "red", ...}``."""
        probs = self.probabilities(images)
        n = len(probs["shape"])
        return [{k: HEADS[k][int(np.argmax(probs[k][i]))] for k in HEADS} for i in range(n)]

    def score(self, images: Any) -> np.ndarray:
        """Concept score per image in [0, 1] (probability of the concept's shape classes)."""
        return self.probabilities(images)["shape"][:, self._positive].sum(axis=1).astype(float)

    def flag(self, images: Any) -> np.ndarray:
        return self.score(images) >= self.threshold


def save_detector(net, directory: str | Path, threshold: float, trained: dict[str, Any],
                  width: int = 32) -> Path:
    """Write weights (safetensors) and config (JSON) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"architecture": "LabShapeNet-v1", "width": width, "threshold": threshold,
              "heads": {k: list(v) for k, v in HEADS.items()}, "input_size": [SIZE, SIZE],
              "input_range": "[-1, 1]", "trained": trained}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory
