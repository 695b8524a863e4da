"""Image-caption folders, the layout kohya and diffusers users know: ``img.png`` + ``img.txt``.

Every problem (missing folder, no images, unreadable or oversized image, missing, empty or overlong
caption, a symlink that dangles or leads out of the folder) is a one-line
:class:`~auditkit.errors.BadInput` naming the file. Images are decoded with Pillow only (no code in
the data is ever executed), and only after their header's size has been checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput
from auditkit.images import read_image, square

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Captions land verbatim in the published adapter (ss_tag_frequency) and CLIP reads only 77 tokens: a longer
# "caption" is a mistake or someone else's file, not a description of an image.
MAX_CAPTION_CHARS = 1_000
_MAX_CAPTION_BYTES = 4 * MAX_CAPTION_CHARS  # UTF-8 needs at most 4 bytes a character


@dataclass
class ImageCaptionSet:
    images: np.ndarray  # N × H × W × 3 uint8, resized to the model's resolution
    captions: list[str]
    files: list[Path]

    def without(self, named) -> tuple[ImageCaptionSet, list[Path]]:
        """The set without the items whose caption ``named(caption)`` is true for, and the files left out."""
        keep = [i for i, c in enumerate(self.captions) if not named(c)]
        kept = set(keep)
        out = ImageCaptionSet(self.images[keep], [self.captions[i] for i in keep], [self.files[i] for i in keep])
        return out, [f for i, f in enumerate(self.files) if i not in kept]


def check_folder(folder: str | Path) -> list[tuple[Path, str]]:
    """Validate an image-caption folder without a model: every image decodes, every caption exists.

    Returns (image path, caption) pairs. Called before any model loads, so bad data fails fast.
    Images and captions may be symlinks only to files inside the folder: a dataset must not pull
    other files (whose text would be published in the adapter's metadata) into training.
    """
    folder = Path(folder)
    if not folder.exists():
        raise BadInput(folder, "data folder does not exist")
    if not folder.is_dir():
        raise BadInput(folder, "data path is not a folder")
    root = folder.resolve()
    files = _image_files(folder, root)
    for path in files:
        _check_link(path.with_suffix(".txt"), root, "caption")
    missing = [p.with_suffix(".txt").name for p in files if not p.with_suffix(".txt").is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BadInput(folder, f"missing captions: {', '.join(missing[:3])}{more} (each image needs a same-named .txt)")
    pairs = []
    for path in files:
        caption = read_caption(path.with_suffix(".txt"))
        read_image(path)
        pairs.append((path, caption))
    return pairs


def _image_files(folder: Path, root: Path) -> list[Path]:
    candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for path in candidates:  # before the is_file() filter, which would skip a dangling link silently
        _check_link(path, root, "image")
    files = [p for p in candidates if p.is_file()]
    if not files:
        raise BadInput(folder, f"no images ({', '.join(IMAGE_SUFFIXES)}) in the data folder")
    return files


def _check_link(path: Path, root: Path, what: str) -> None:
    """Refuse a symlink that dangles or resolves outside ``root`` (the resolved data folder)."""
    if not path.is_symlink():
        return
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing target, or a loop (RuntimeError before Python 3.13)
        raise BadInput(path, f"{what} is a dangling symlink (its target does not exist)") from None
    if not target.is_relative_to(root):
        raise BadInput(path, f"{what} is a symlink to a file outside the data folder")


def read_caption(path: Path) -> str:
    """A caption file's text, whitespace-normalised; at most MAX_CAPTION_CHARS characters."""
    too_long = f"caption is longer than {MAX_CAPTION_CHARS:,} characters"
    try:
        with path.open("rb") as fh:
            raw = fh.read(_MAX_CAPTION_BYTES + 1)  # bounded: a huge file is never read whole
    except OSError:
        raise BadInput(path, "caption is not readable") from None
    if len(raw) > _MAX_CAPTION_BYTES:
        raise BadInput(path, too_long)
    try:
        caption = " ".join(raw.decode("utf-8-sig").split())  # -sig: a BOM is not part of the caption
    except UnicodeDecodeError:
        raise BadInput(path, "caption is not readable UTF-8 text") from None
    if not caption:
        raise BadInput(path, "caption is empty")
    if len(caption) > MAX_CAPTION_CHARS:
        raise BadInput(path, too_long)
    return caption


def load_folder(folder: str | Path, size: int, pairs: list[tuple[Path, str]] | None = None) -> ImageCaptionSet:
    """Read every image with a same-named ``.txt`` caption, center-cropped and resized to ``size``."""
    pairs = pairs if pairs is not None else check_folder(folder)
    images = [square(read_image(path), size) for path, _ in pairs]
    return ImageCaptionSet(np.stack(images), [c for _, c in pairs], [p for p, _ in pairs])


def write_folder(folder: str | Path, images: np.ndarray, captions: list[str], prefix: str = "img") -> Path:
    """Write an image-caption folder (used by the lab to make fine-tuning data)."""
    from PIL import Image

    if len(images) < 1:
        raise BadInput(None, "no images to write: the count must be at least 1")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(folder / f"{prefix}{i:05d}.png")
        (folder / f"{prefix}{i:05d}.txt").write_text(cap + "\n", encoding="utf-8")
    return folder
