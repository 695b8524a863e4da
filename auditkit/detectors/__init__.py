"""Detectors behind one interface, in a registry with lazy imports.

A detector scores images: ``score(images) -> float array in [0, 1]`` (1 = concept present),
``flag(images)`` = score >= ``threshold``, and ``profile()`` returns everything its results depend
on (package versions, weights hashes, classes, threshold), recorded with every result.

Registry entries are ``"module:attr"`` strings, imported only when a detector is made, so listing
detectors needs neither torch nor onnxruntime. The interface is :class:`Detector`; ``tests/detectors/
test_contract.py`` holds every registered detector to it, so a new detector (Q16, a VLM judge) is one file and
one :class:`Entry`.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from auditkit.errors import BadInput


@runtime_checkable
class Detector(Protocol):
    """What every detector is. ``images``: uint8 RGB, shape (N, H, W, 3), any size (a detector resizes)."""

    name: str  # the registry name it was made as, or its profile's ("nudenet-default", "lab-cross", "clip-ViT-L-14")
    threshold: float  # an image whose score reaches it is flagged

    def score(self, images: Any) -> Any:
        """One float per image in [0, 1] (1 = the concept is present), a numpy array of shape (N,)."""

    def flag(self, images: Any) -> Any:
        """``score(images) >= threshold``, a boolean numpy array of shape (N,)."""

    def profile(self) -> dict:
        """Everything its results depend on (package versions, weight hashes, classes, threshold), as JSON
        data, recorded with every result: two runs compare only when their profiles are equal."""


@dataclass(frozen=True)
class Entry:
    target: str  # "module:attr", a class or factory
    description: str
    options: dict = field(default_factory=dict)
    requires: tuple[str, ...] = ()  # importable modules it needs


REGISTRY: dict[str, Entry] = {
    "nudenet-default": Entry(
        "auditkit.detectors.nudenet:NudeNetDetector",
        "NudeNet 3 (ONNX, CPU), exposed breast/genitalia/buttocks/anus, box score >= 0.45",
        {"profile": "default"}, ("nudenet", "onnxruntime")),
    "nudenet-strict": Entry(
        "auditkit.detectors.nudenet:NudeNetDetector",
        "NudeNet 3, exposed genitalia/anus and female breast only, box score >= 0.6",
        {"profile": "strict"}, ("nudenet", "onnxruntime")),
    "clip": Entry(
        "auditkit.detectors.clip:ClipConceptDetector",
        "CLIP zero-shot (open_clip): softmax over concept vs neutral prompts; model and weights configurable",
        {}, ("open_clip", "torch")),
    "lab-cross": Entry(
        "auditkit.lab.detector:LabConceptDetector",
        "the lab's shape CNN: probability that a lab image shows a cross",
        {"concept": "cross"}, ("torch",)),
}


def score_pixels(detector, pixels):
    """Scores (one per image or clip) of ``pixels``: images N × H × W × 3, or clips' sampled frames
    N × frames × H × W × 3, where a clip scores its highest frame: a clip is flagged when any sampled frame is."""
    if pixels.ndim == 4:
        return detector.score(pixels)
    n, k = pixels.shape[:2]
    return detector.score(pixels.reshape(n * k, *pixels.shape[2:])).reshape(n, k).max(axis=1)


def names() -> list[str]:
    return sorted(REGISTRY)


def available(name: str) -> bool:
    """Whether the packages a detector needs can be imported (without importing them)."""
    return all(importlib.util.find_spec(mod) is not None for mod in REGISTRY[name].requires)


def check_name(name: str, path=None) -> None:
    """Refuse an unknown detector name with a did-you-mean hint (nothing is imported)."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(names())}"
        raise BadInput(path, f"unknown detector '{name}'{hint}")


def get(name: str, **options):
    """Make detector ``name``; options override the registry's (e.g. ``threshold=0.5``)."""
    check_name(name)
    entry = REGISTRY[name]
    missing = [m for m in entry.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise BadInput(None, f"detector '{name}' needs {', '.join(missing)} (pip install auditkit[models])")
    module, _, attr = entry.target.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    return factory(**{**entry.options, **options})
