"""Shifted traffic: test images made unlike the calibration data, to exercise the exit-quality monitor
(bench/monitor_replay.py, tests/test_monitor.py). Numpy and Pillow only; nothing is downloaded:
"another kind entirely" is letters and digits drawn with Pillow's own font.
"""

from __future__ import annotations

import string
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFilter, ImageFont

Images = npt.NDArray[np.uint8]  # (n, 28, 28) grey levels


def _each(images: Images, change: Callable[[Image.Image], Image.Image]) -> Images:
    return np.stack([np.asarray(change(Image.fromarray(i))) for i in images])


def noise(images: Images, rng: np.random.Generator) -> Images:
    """Gaussian noise of σ = 60 grey levels."""
    return np.clip(images + rng.normal(0, 60, images.shape), 0, 255).astype(np.uint8)


def blur(images: Images, rng: np.random.Generator) -> Images:
    return _each(images, lambda im: im.filter(ImageFilter.GaussianBlur(1.5)))


def contrast(images: Images, rng: np.random.Generator) -> Images:
    """A fifth of the contrast: a dim exposure."""
    return (images * 0.2).astype(np.uint8)


def rotation(images: Images, rng: np.random.Generator) -> Images:
    """A quarter turn."""
    return _each(images, lambda im: im.rotate(90))


def glyphs(images: Images, rng: np.random.Generator) -> Images:
    """Images of another kind entirely: a letter or digit per image, white on black, as large as fits."""
    font, chars = ImageFont.load_default(size=24), string.ascii_letters + string.digits
    out = []
    for ch in rng.choice(list(chars), len(images)):
        im = Image.new("L", images.shape[1:][::-1])
        ImageDraw.Draw(im).text((im.width / 2, im.height / 2), str(ch), fill=255, font=font, anchor="mm")
        out.append(np.asarray(im))
    return np.stack(out)


SHIFTS: dict[str, Callable[[Images, np.random.Generator], Images]] = {
    "noise": noise,
    "blur": blur,
    "contrast": contrast,
    "rotation": rotation,
    "glyphs": glyphs,
}
