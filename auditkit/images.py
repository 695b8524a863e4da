"""Images read from untrusted files: decoded with Pillow only (no code in an image is ever executed), their size
checked from the header before any pixel is decoded, every problem a one-line
:class:`~auditkit.errors.BadInput` naming the file; and squared to a model's size.

Used by training data folders (:mod:`auditkit.train.data`), a suite's input images (:mod:`auditkit.suites`) and
the edit families' input (:mod:`auditkit.models.family.kontext`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput

MAX_PIXELS = 64_000_000  # refuse decompression bombs: checked from the header, before any pixel is decoded
# Modes Pillow opens 16-bit greyscale PNGs in; convert("RGB") clips them at 255 (white).
_WIDE_GREY = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def read_image(path: Path):
    """The RGB image at ``path`` (a PIL image), its size checked from the header before any pixel is decoded;
    BadInput naming the file when it is oversized or unreadable."""
    from PIL import Image

    limit = f"the {MAX_PIXELS // 1_000_000} Mpx limit"
    try:
        with warnings.catch_warnings():
            # Pillow's own warning is several lines; the size check below is ours and says it in one.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise BadInput(path, f"image is {w}×{h} ({w * h / 1e6:.0f} Mpx), over {limit}")
                im.load()
                return _to_rgb(im)
    except BadInput:
        raise
    except Image.DecompressionBombError:  # over twice Pillow's limit: refused by Image.open itself
        raise BadInput(path, f"image is over {limit} (decompression bomb?)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt files
        raise BadInput(path, f"unreadable image ({type(exc).__name__})") from None


def _to_rgb(im):
    """RGB copy of a decoded image; 16-bit greyscale is scaled 0..65535 → 0..255, not clipped."""
    from PIL import Image

    if im.mode not in _WIDE_GREY:
        return im.convert("RGB")
    grey = np.asarray(im).astype(np.int64).clip(0, 65535)
    u8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)  # rounded
    return Image.fromarray(np.repeat(u8[..., None], 3, axis=-1))


def square(image, size: int) -> np.ndarray:
    """``image`` (PIL) center-cropped to a square and resized to ``size`` × ``size``, as uint8 H × W × 3."""
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def pixel_metrics(a: np.ndarray, b: np.ndarray) -> dict:
    """How close two stacks of uint8 images (N × H × W × 3) are, pair by pair: 1 − mean |a − b| / 255 and the mean
    PSNR (dB; 100 for identical pairs)."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    mse = np.mean(diff**2, axis=(1, 2, 3))
    psnr = np.where(mse > 0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)), 100.0)
    return {"pixel_similarity": float(1 - diff.mean() / 255), "psnr_db": float(np.mean(psnr))}
