"""Image-caption folders, the layout kohya and diffusers users know: ``img.png`` + ``img.txt``.

Every problem (missing folder, no images, unreadable image, missing or empty caption) is a
one-line :class:`~auditkit.errors.BadInput` naming the file. Images are decoded with Pillow only
(no code in the data is ever executed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 64_000_000  # refuse decompression bombs


@dataclass
class ImageCaptionSet:
    images: np.ndarray  # N × H × W × 3 uint8, resized to the model's resolution
    captions: list[str]
    files: list[Path]


def check_folder(folder: str | Path) -> list[tuple[Path, str]]:
    """Validate an image-caption folder without a model: every image decodes, every caption exists.

    Returns (image path, caption) pairs. Called before any model loads, so bad data fails fast.
    """
    from PIL import Image

    folder = Path(folder)
    if not folder.exists():
        raise BadInput(folder, "data folder does not exist")
    if not folder.is_dir():
        raise BadInput(folder, "data path is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise BadInput(folder, f"no images ({', '.join(IMAGE_SUFFIXES)}) in the data folder")
    missing = [p.with_suffix(".txt").name for p in files if not p.with_suffix(".txt").is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BadInput(folder, f"missing captions: {', '.join(missing[:3])}{more} (each image needs a same-named .txt)")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    pairs = []
    for path in files:
        try:
            caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise BadInput(path.with_suffix(".txt"), "caption is not readable UTF-8 text") from None
        if not caption:
            raise BadInput(path.with_suffix(".txt"), "caption is empty")
        _decode(path)
        pairs.append((path, " ".join(caption.split())))
    return pairs


def _decode(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt files
        raise BadInput(path, f"unreadable image ({type(exc).__name__})") from None


def load_folder(folder: str | Path, size: int, pairs: list[tuple[Path, str]] | None = None) -> ImageCaptionSet:
    """Read every image with a same-named ``.txt`` caption, center-cropped and resized to ``size``."""
    pairs = pairs if pairs is not None else check_folder(folder)
    images = [_square(_decode(path), size) for path, _ in pairs]
    return ImageCaptionSet(np.stack(images), [c for _, c in pairs], [p for p, _ in pairs])


def _square(image, size: int) -> np.ndarray:
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def write_folder(folder: str | Path, images: np.ndarray, captions: list[str], prefix: str = "img") -> Path:
    """Write an image-caption folder (used by the lab to make fine-tuning data)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(folder / f"{prefix}{i:05d}.png")
        (folder / f"{prefix}{i:05d}.txt").write_text(cap + "\n", encoding="utf-8")
    return folder
