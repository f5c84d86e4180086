"""Safe image loading for training data.

User folders contain whatever people dropped in them: 16-bit PNGs, CMYK JPEGs, palette
GIFs with transparency, phone photos that are only upright once EXIF orientation is
applied, files cut short by an interrupted copy, and occasionally an image whose header
claims billions of pixels (a decompression bomb). A training run that dies on image
41,207 after three hours is the worst way to find out, so everything here turns those
cases into one exception type, :class:`BadImageError`, that the dataset can count and
skip, and turns every good image into the same thing: an upright RGB image with
transparency composited onto white (transparent pixels of an RGBA image are often
black or garbage underneath; white is what a viewer shows and what emoji-style data
expects).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "BadImageError",
    "check_image",
    "load_image",
    "to_rgb",
]

#: Refuse images above this many pixels. 64 MP is larger than any camera or upscaler
#: output people train on, and far below what would exhaust memory when decoded
#: (64 MP RGB is ~190 MB). PIL's own guard (``Image.MAX_IMAGE_PIXELS``, ~89 MP warning,
#: ~179 MP error) is global state; we check our own limit instead of mutating it.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

# EXIF orientations 5-8 rotate by 90 degrees, which swaps width and height.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


class BadImageError(ValueError):
    """An image file that cannot be used for training.

    Carries ``path`` and ``reason`` separately so a dataset can tally reasons
    ("truncated", "too many pixels", ...) while the message stays readable.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) through pickling (DataLoader workers)
        return (type(self), (self.path, self.reason))


def _limit(max_pixels: int | None) -> int:
    return DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)


def _check_pixels(path: str | os.PathLike[str], size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise BadImageError(path, f"invalid image size {width}x{height}")
    pixels = width * height
    if pixels > max_pixels:
        raise BadImageError(
            path,
            f"image is {width}x{height} = {pixels:,} pixels, over the limit of {max_pixels:,} "
            "(possible decompression bomb; raise max_pixels if the image is genuine)",
        )


def _open(path: str | os.PathLike[str]) -> Image.Image:
    """``Image.open`` with every failure mapped to :class:`BadImageError`."""
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; PIL's global warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as e:
        raise BadImageError(path, f"decompression bomb refused by PIL: {e}") from e
    except FileNotFoundError as e:
        raise BadImageError(path, "file not found") from e
    except UnidentifiedImageError as e:
        raise BadImageError(path, "not a recognised image format") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadImageError(path, f"unreadable image header: {e}") from e


def check_image(
    path: str | os.PathLike[str], max_pixels: int | None = None, *, level: str = "header"
) -> tuple[int, int]:
    """Validate an image cheaply and return its upright ``(width, height)``.

    Used at scan time so a dataset can skip bad files before training starts. With
    ``level="header"`` (default) this reads the header and runs PIL's ``verify()`` (for
    PNG that walks every chunk and checks its CRC, which catches truncation; for JPEG it
    is header-only), without decoding pixels. ``level="full"`` decodes the image too,
    for when a slower scan that catches everything is preferred; ``level="none"`` only
    reads the header (size and pixel limit), for trusted folders too large to verify.

    The returned size already accounts for EXIF rotation, because aspect-ratio bucketing
    must see the image the way :func:`load_image` will return it.
    """
    if level not in ("none", "header", "full"):
        raise ValueError(f"level must be 'none', 'header' or 'full', got {level!r}")
    limit = _limit(max_pixels)
    if level != "none":
        # verify() must run on a freshly opened file and leaves it unusable afterwards,
        # so it gets its own open; the header parse is cheap.
        im = _open(path)
        try:
            _check_pixels(path, im.size, limit)
            im.verify()
        except BadImageError:
            raise
        except Exception as e:  # PIL raises a zoo of types (SyntaxError, OSError, struct.error...)
            raise BadImageError(path, f"corrupt or truncated image: {e}") from e
        finally:
            im.close()
    im = _open(path)
    try:
        _check_pixels(path, im.size, limit)
        width, height = im.size
        try:
            orientation = im.getexif().get(_EXIF_ORIENTATION_TAG)
        except Exception:  # a broken EXIF block should not reject an otherwise good image
            orientation = None
        if orientation in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
    finally:
        im.close()
    if level == "full":
        load_image(path, max_pixels=limit).close()
    return width, height


def load_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> Image.Image:
    """Load ``path`` as an upright RGB image, or raise :class:`BadImageError`.

    The pixel limit is checked from the header *before* decoding, so a bomb never
    allocates its pixels. Truncated files raise instead of being silently padded with
    grey (PIL's ``LOAD_TRUNCATED_IMAGES`` is left at its default, False). Animated images
    contribute their first frame.
    """
    limit = _limit(max_pixels)
    im = _open(path)
    try:
        _check_pixels(path, im.size, limit)
        try:
            im.load()
            upright = ImageOps.exif_transpose(im)
        except Exception as e:
            raise BadImageError(path, f"corrupt or truncated image: {e}") from e
        try:
            rgb = to_rgb(upright if upright is not None else im)
        except (OSError, ValueError) as e:  # e.g. a colour mode PIL cannot convert to RGB
            raise BadImageError(path, f"cannot convert {im.mode} image to RGB: {e}") from e
        if rgb is im:  # make sure the returned image does not reference the open file
            rgb = im.copy()
        return rgb
    finally:
        im.close()


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto ``background``.

    ``Image.convert("RGB")`` simply drops alpha, which turns transparent regions into
    whatever colour the encoder left there (often black), and clips 16-bit greyscale to
    white; both would silently poison training data.
    """
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 16-bit range -> 8-bit range
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        mode = "L"
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if mode == "RGB":
        return im
    return im.convert("RGB")
