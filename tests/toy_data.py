"""Tiny, learnable image folders made on the fly: one coloured shape per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("bird", "boat", "cat", "dog")
COLOURS = {"bird": (220, 40, 40), "boat": (40, 200, 60), "cat": (50, 70, 230), "dog": (230, 210, 40)}


def draw_example(label: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(0, 90, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    half = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(half, size - half, 2))
    box = (cx - half, cy - half, cx + half, cy + half)
    index = CLASSES.index(label) if label in CLASSES else sum(map(ord, label)) % 4
    base = COLOURS.get(label, COLOURS[CLASSES[index]])
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in base)
    if index == 0:
        draw.ellipse(box, fill=colour)
    elif index == 1:
        draw.rectangle(box, fill=colour)
    elif index == 2:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    else:
        draw.rectangle((cx - half, cy - 2, cx + half, cy + 2), fill=colour)
        draw.rectangle((cx - 2, cy - half, cx + 2, cy + half), fill=colour)
    noise = rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def make_image_folder(root: Path, per_class: int = 40, classes=CLASSES, seed: int = 0, size: int = 32) -> Path:
    """Write ``root/<class>/NNN.(jpg|png)``, alternating formats; returns root."""
    rng = np.random.default_rng(seed)
    for label in classes:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = draw_example(label, rng, size)
            if i % 2:
                image.save(folder / f"{i:03d}.png")
            else:
                image.save(folder / f"{i:03d}.jpg", quality=92)
    return root
