"""Turn a client's image into a model input, exactly as training's folder dataset does."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from branchserve.repo.manifest import InputSpec
from branchserve.repo.tensors import FloatArray

MAX_IMAGE_PIXELS = 4096 * 4096
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises on bad data


class ImageError(ValueError):
    """An image that cannot be decoded or is too large; the message is safe to show a client."""


def open_image(data: bytes) -> Image.Image:
    """Read an image's header (its pixels are decoded later, by `image_to_input`), refusing one
    that is not a PNG/JPEG or has more than MAX_IMAGE_PIXELS pixels."""
    if not data:
        raise ImageError("empty image body")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("cannot decode image: not a PNG or JPEG file") from None
    except DECODE_ERRORS as e:
        raise ImageError(f"cannot decode image: {e}") from None
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise ImageError(f"image of {img.width}x{img.height} pixels exceeds {MAX_IMAGE_PIXELS} pixels")
    return img


def image_to_input(img: Image.Image, spec: InputSpec) -> FloatArray:
    """Convert colour mode, resize to the input size, scale and normalise; returns (C, H, W) float32."""
    channels, height, width = spec.shape
    try:
        img.load()
    except DECODE_ERRORS as e:
        raise ImageError(f"cannot decode image: {e}") from None
    if img.mode in ("RGBA", "LA", "P") and spec.color_mode == "L":
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    img = img.convert(spec.color_mode)
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) * spec.scale
    arr = (arr - spec.mean) / spec.std
    return arr.reshape(height, width, channels).transpose(2, 0, 1).copy()
