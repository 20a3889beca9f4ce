"""Decode image bytes into the uint8 RGB arrays the networks see.

Training and serving both call :func:`decode_image` on the file's bytes, so an image is
converted and resized the same way in both places. Only Pillow, simplejpeg and numpy: the
service imports this without torch.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.runtime.model_folder import MAX_PIXELS

try:  # libjpeg-turbo straight into numpy; without it every image goes through Pillow
    import simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheel
    simplejpeg = None

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class ImageDecodeError(ValueError):
    """The bytes are not an image this project can read; the message says why."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white rather than whatever colour they hide.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: scale to 8 bits instead of clipping.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(
    source: Union[bytes, bytearray, memoryview, str, Path],
    size: int = 32,
    max_pixels: int = MAX_PIXELS,
    name: str | None = None,
) -> np.ndarray:
    """Return a ``(3, size, size)`` uint8 array.

    The image is rotated by its EXIF orientation, reduced to its first frame, made RGB,
    centre-cropped to a square and resized with bilinear (antialiased) filtering.
    Raises :class:`ImageDecodeError` with one sentence naming the problem.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "the image")
    if isinstance(source, (str, Path)):
        try:
            source = Path(source).read_bytes()
        except OSError as error:
            raise ImageDecodeError(f"{label} could not be decoded: {error}.") from error
    if len(source) == 0:
        raise ImageDecodeError(f"{label} is empty (0 bytes).")
    data = bytes(source)
    fast = _decode_small_jpeg(data, size, max_pixels)
    if fast is not None:
        return fast
    stream = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                width, height = image.size
                if width < 1 or height < 1:
                    raise ImageDecodeError(f"{label} has no pixels ({width}x{height}).")
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        f"{label} is {width}x{height} pixels, over the limit of {max_pixels:,} pixels."
                    )
                if image.format == "JPEG":
                    # Let libjpeg decode at a reduced scale: big photos get fast and small.
                    image.draft("RGB", (size * 2, size * 2))
                image.seek(0)
                image.load()
                if _may_be_rotated(image):
                    image = ImageOps.exif_transpose(image)
                # Everything below works on the loaded pixels, before the file closes.
                return _square_array(_to_rgb(image), size)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError(
            f"{label} is over the limit of {max_pixels:,} pixels (refused as a decompression bomb)."
        ) from None
    except UnidentifiedImageError as error:
        raise ImageDecodeError(f"{label} is not a readable image ({type(error).__name__}).") from error
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, ZeroDivisionError) as error:
        raise ImageDecodeError(f"{label} could not be decoded: {error}.") from error


# Where Pillow's getexif() finds an orientation: without any of these, exif_transpose() is a no-op
# (and on a small served image it cost about a third of the decode).
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def _decode_small_jpeg(data: bytes, size: int, max_pixels: int) -> np.ndarray | None:
    """The common upload (a small colour or grey JPEG without EXIF or XMP) decoded by libjpeg-turbo
    straight into numpy: 16-29 us for a 32x32 image where Pillow's path takes 78-143 us
    (``bench/request_cost.py``, back to back and right after a model call).

    The same library with Pillow's settings (accurate integer DCT, smooth chroma upsampling) gives
    the same pixels: identical on all 20,000 training images and on every JPEG kind in the tests.
    Whatever could decode differently through Pillow returns None and goes there instead: an APP1
    segment (EXIF or XMP, which may rotate it), CMYK, an image Pillow would decode at a reduced
    scale, anything over the pixel limit, and anything libjpeg warns about.
    """
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray") or width * height > max_pixels or min(width, height) < 1:
            return None
        if min(width // (2 * size), height // (2 * size)) >= 2:  # Pillow's draft() would scale it down
            return None
        if b"\xff\xe1" in data:  # an APP1 marker (entropy-coded data never holds one): maybe rotated
            return None
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
    except Exception:  # noqa: BLE001 - Pillow decodes it, or says in a sentence why not
        return None
    if rgb.shape != (height, width, 3):
        return None
    if width == height == size:
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))
    return _square_array(Image.fromarray(rgb), size)


def _may_be_rotated(image: Image.Image) -> bool:
    return hasattr(image, "tag_v2") or any(key in image.info for key in _ORIENTATION_SOURCES)


def _square_array(image: Image.Image, size: int) -> np.ndarray:
    """Centre-crop to a square, resize to ``size`` (bilinear, antialiased), as (3, size, size) uint8."""
    if image.width != image.height:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
