"""Pictures of what a convnet computes, with numpy and Pillow only (the service has no torch).

Feature maps become grey tiles in a grid, filters become small RGB tiles, a Grad-CAM map
becomes a heat overlay, and the classic hand-made kernels (box blur, edges, sharpen)
are applied to an image for comparison with the learned first-layer filters.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from PIL import Image

GAP = 2  # pixels between tiles
TILE = 64  # target tile side for feature maps
FILTER_TILE = 36  # target tile side for filters
MAX_MAPS = 64  # a stage with more channels shows its 64 most active maps

# Hand-made 3x3 kernels from the classic explanations of convolution.
KERNELS: dict[str, list[list[float]]] = {
    "box blur": [[1 / 9] * 3] * 3,
    "vertical edges": [[-1.0, 0.0, 1.0]] * 3,
    "horizontal edges": [[-1.0] * 3, [0.0] * 3, [1.0] * 3],
    "sharpen": [[0.0, -1.0, 0.0], [-1.0, 5.0, -1.0], [0.0, -1.0, 0.0]],
}

# Perceptually ordered heat colours (anchors of matplotlib's "inferno"), interpolated to 256.
_ANCHORS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                     [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float64)
HEAT = np.stack([np.interp(np.linspace(0, len(_ANCHORS) - 1, 256), np.arange(len(_ANCHORS)), _ANCHORS[:, c])
                 for c in range(3)], axis=1).round().astype(np.uint8)


def scale_for(side: int, target: int) -> int:
    return max(1, target // max(side, 1))


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, cols) of a near-square grid."""
    cols = max(1, math.ceil(math.sqrt(count)))
    return math.ceil(count / cols), cols


def tile(tiles: np.ndarray, scale: int = 1, gap: int = GAP, background: int = 255) -> np.ndarray:
    """``(N, H, W)`` or ``(N, H, W, 3)`` uint8 -> one uint8 grid image, each tile upscaled ``scale`` times."""
    tiles = np.repeat(np.repeat(tiles, scale, axis=1), scale, axis=2)
    n, h, w = tiles.shape[:3]
    rows, cols = grid_shape(n)
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, *tiles.shape[3:]), background, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = tiles[i]
    return out


def normalize_maps(maps: np.ndarray) -> np.ndarray:
    """Each map of ``(C, H, W)`` stretched to 0..255 on its own (a constant map is black)."""
    maps = np.asarray(maps, dtype=np.float32)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return (np.where(span > 0, (maps - low) / np.where(span > 0, span, 1), 0) * 255).round().astype(np.uint8)


def strongest(maps: np.ndarray, limit: int = MAX_MAPS) -> np.ndarray:
    """Indices of the ``limit`` maps with the largest mean activation, in channel order."""
    if len(maps) <= limit:
        return np.arange(len(maps))
    return np.sort(np.argsort(-maps.mean(axis=(1, 2)), kind="stable")[:limit])


def feature_map_grid(maps: np.ndarray, limit: int = MAX_MAPS) -> np.ndarray:
    """``(C, H, W)`` activations -> grey grid of the strongest ``limit`` maps."""
    maps = np.asarray(maps)[strongest(np.asarray(maps), limit)]
    return tile(normalize_maps(maps), scale_for(maps.shape[-1], TILE))


def filter_grid(weights: np.ndarray) -> np.ndarray:
    """``(out, in, k, k)`` conv weights -> grid of tiles; RGB for 3 input channels, grey otherwise.

    Each filter is scaled by its own largest |weight|: mid-grey is 0, bright is positive.
    """
    weights = np.asarray(weights, dtype=np.float32)
    peak = np.abs(weights).max(axis=(1, 2, 3), keepdims=True)
    scaled = (weights / np.where(peak > 0, peak, 1) * 127.5 + 127.5).clip(0, 255).round().astype(np.uint8)
    tiles = scaled.transpose(0, 2, 3, 1) if weights.shape[1] == 3 else scaled.mean(axis=1).astype(np.uint8)
    return tile(tiles, scale_for(weights.shape[-1], FILTER_TILE))


def upscale(image: np.ndarray, side: int, resample=Image.NEAREST) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((side, side), resample))


def heatmap(cam: np.ndarray, side: int) -> np.ndarray:
    """A Grad-CAM map ``(h, w)`` -> ``(side, side, 3)`` heat colours, 0 to its own maximum."""
    cam = np.asarray(cam, dtype=np.float32)
    peak = float(cam.max())
    unit = cam / peak if peak > 0 else np.zeros_like(cam)
    smooth = np.asarray(Image.fromarray(unit).resize((side, side), Image.BILINEAR)).clip(0, 1)
    return HEAT[(smooth * 255).round().astype(np.uint8)]


def overlay(image: np.ndarray, cam: np.ndarray, side: int = 128, alpha: float = 0.5) -> np.ndarray:
    """``(H, W, 3)`` uint8 image with its Grad-CAM map blended on top, ``side`` pixels square."""
    base = upscale(image, side, Image.BILINEAR).astype(np.float32)
    return (base * (1 - alpha) + heatmap(cam, side).astype(np.float32) * alpha).round().astype(np.uint8)


def convolve(gray: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """'Same'-size 2-D cross-correlation (what conv layers compute), borders repeated."""
    kernel = np.asarray(kernel, dtype=np.float32)
    kh, kw = kernel.shape
    padded = np.pad(gray.astype(np.float32), ((kh // 2, kh // 2), (kw // 2, kw // 2)), mode="edge")
    out = np.zeros(gray.shape, np.float32)
    for i in range(kh):
        for j in range(kw):
            out += kernel[i, j] * padded[i: i + gray.shape[0], j: j + gray.shape[1]]
    return out


def grayscale(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def apply_kernels(image: np.ndarray) -> dict[str, np.ndarray]:
    """Each hand-made kernel applied to the grey ``(H, W, 3)`` image, as a uint8 picture.

    Blur and sharpen keep the brightness scale (clipped); edge responses show |response|
    stretched to 0..255, as edge pictures usually do.
    """
    gray = grayscale(image)
    out = {}
    for name, kernel in KERNELS.items():
        response = convolve(gray, np.array(kernel))
        if "edges" in name:
            response = np.abs(response)
            response = response / max(float(response.max()), 1e-6) * 255
        out[name] = response.clip(0, 255).round().astype(np.uint8)
    return out


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()


def png_base64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")
