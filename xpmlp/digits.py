"""A digit from an image file, made the way MNIST's own digits were made.

MNIST's digits are white on black, scaled to fit a 20x20 box keeping their aspect
ratio (anti-aliased), then placed in a 28x28 field so that their centre of mass is at
its centre.  ``mnist_digit`` does the same to a PNG or JPEG of any size, so a network
trained on MNIST reads a digit someone wrote.
"""
import warnings
from pathlib import Path

import numpy as np

BOX = 20    # the digit's longer side after fitting
FIELD = 28  # the image the network reads
# Where MNIST puts the centre of mass, in pixel indices: every test digit's lies within
# half a pixel of (14, 14), the result of rounding its translation to whole pixels.
CENTRE = 14.0
# A PNG is decoded whole before it can be reduced: larger ones are refused (a 69-byte PNG
# can claim 60000x60000).  Pillow's own, higher, limit would print a warning, then raise.
MAX_PIXELS = 64_000_000
FORMATS = ("PNG", "JPEG")  # nothing else is opened (EPS would run Ghostscript)
# Larger images are decoded (JPEG) or box-averaged (PNG) to about this on their longer
# side: the digit ends up 20 pixels tall, so nothing it needs is lost.
WORK_SIDE = 2048


class ImageError(Exception):
    """A file that holds no usable digit: one line for the user."""


def read_gray(path) -> np.ndarray:
    """The image at ``path`` as a float32 array of grey levels 0-255 (transparency
    composited onto white, the usual background of a drawn digit)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # over Pillow's limit: one line, not a warning
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=FORMATS) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(_too_large(path, img.size))
                img = ImageOps.exif_transpose(_reduced(img))  # a phone photo's orientation
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    img = img.convert("RGBA")
                    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                    img = Image.alpha_composite(background, img)
                if img.mode.startswith("I"):  # a 16-bit greyscale PNG: Pillow's convert("L") would clip it
                    gray = np.asarray(img, dtype=np.float32) / 257
                else:
                    gray = np.asarray(img.convert("L"), dtype=np.float32)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image predict reads (PNG or JPEG only)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(_too_large(path)) from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or damaged image data
        raise ImageError(f"{path}: unreadable image ({exc})") from None
    if gray.size == 0:
        raise ImageError(f"{path}: the image is empty (0 pixels)")
    return gray


def _too_large(path, size=None):
    pixels = f"{size[0]}x{size[1]} pixels" if size else "more pixels than Pillow's safety limit"
    return (f"{path}: image too large ({pixels}; at most {MAX_PIXELS // 10**6} megapixels): "
            "scale it down first")


def _reduced(img):
    """``img`` decoded at most about WORK_SIDE pixels on its longer side: a JPEG at 1/2, 1/4
    or 1/8 of its size by its decoder (draft), a PNG decoded whole, then box-averaged."""
    factor = -(-max(img.size) // WORK_SIDE)
    if factor > 1:
        img.draft(None, (img.width // factor, img.height // factor))  # does nothing but on a JPEG
    img.load()
    factor = -(-max(img.size) // WORK_SIDE)
    if factor == 1:
        return img
    if img.mode.startswith("I;16"):
        img = img.convert("I")
    elif img.mode not in ("L", "LA", "RGB", "RGBA", "I", "F"):  # palette, 1-bit: reduce takes neither
        img = img.convert("RGBA")
    return img.reduce(factor)


def mnist_digit(gray) -> np.ndarray:
    """A (28, 28) uint8 MNIST-style digit (white ink on black) from grey levels 0-255."""
    from PIL import Image

    gray = np.asarray(gray, dtype=np.float32)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 127:  # dark ink on a light background
        gray, border = 255 - gray, 255 - border
    # The border's brighter pixels measure the background's noise (paper, JPEG): below
    # that level is background.  A clean image's border is 0, and nothing is lost.
    ink = np.clip(gray - np.percentile(border, 90), 0, None)
    if ink.max() <= 0:
        raise ImageError("no digit found: the image is blank")
    ink *= 255 / ink.max()  # MNIST's strokes reach (nearly) full white; a pencil's may not
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = ink.shape
    scale = BOX / max(h, w)
    if scale != 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        # BOX averages the pixels each output pixel covers, the anti-aliasing of shrinking
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
        ink = np.clip(np.asarray(Image.fromarray(ink).resize(size, resample)), 0, 255)
    ink = np.round(ink).astype(np.uint8)
    field = np.zeros((FIELD, FIELD), np.uint8)
    mass = ink.astype(np.float64)
    if mass.sum() == 0:  # a speck that vanished when shrunk
        raise ImageError("no digit found: the ink is too faint or too small")
    cy = (mass.sum(axis=1) @ np.arange(mass.shape[0])) / mass.sum()
    cx = (mass.sum(axis=0) @ np.arange(mass.shape[1])) / mass.sum()
    top, left = round(CENTRE - cy), round(CENTRE - cx)  # whole pixels, as MNIST did
    # Paste, cutting what falls outside the field (only a very lopsided digit does).
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + ink.shape[0], FIELD), min(left + ink.shape[1], FIELD)
    field[r0:r1, c0:c1] = ink[r0 - top:r1 - top, c0 - left:c1 - left]
    return field


def read_digit(path) -> tuple[np.ndarray, np.ndarray]:
    """(the file's grey levels, the (28, 28) uint8 digit made from them)."""
    gray = read_gray(path)
    try:
        return gray, mnist_digit(gray)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None
