"""Decode image bytes into the uint8 RGB arrays the networks see.

Training and serving both call :func:`decode_image`, so an image is converted and
resized the same way in both places. Only PIL and numpy: the service imports this
without torch.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: a large phone photo, far below a decompression bomb


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
    return image.convert("RGB")


def decode_image(
    source: Union[bytes, str, Path],
    size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> np.ndarray:
    """Return a ``(3, size, size)`` uint8 array.

    The image is rotated by its EXIF orientation, reduced to its first frame, made RGB,
    centre-cropped to a square and resized with bilinear (antialiased) filtering.
    Raises :class:`ImageDecodeError` with one sentence naming the problem.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "the image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError(f"{label} is empty (0 bytes).")
        stream: Union[io.BytesIO, str, Path] = io.BytesIO(bytes(source))
    else:
        stream = source
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
                image = ImageOps.exif_transpose(image)
                image = _to_rgb(image)
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
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
