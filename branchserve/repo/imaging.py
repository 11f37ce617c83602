"""Turn a client's image into a model input, exactly as training's folder dataset does."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from branchserve.repo.manifest import InputSpec
from branchserve.repo.tensors import FloatArray

MAX_IMAGE_PIXELS = 4096 * 4096
Image.init()  # import Pillow's format plugins now: on a server's first request they took 15–30 ms, so admission shed it
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises on bad data
SIGNATURES = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}
"""The formats an image may have, by their first bytes; Pillow's plugin names are the upper-case keys.
Anything else is refused before a decoder runs: Pillow reads dozens of formats, some of which decode
inside `Image.open` (an ICO's embedded PNG) or hand the data to other programs (EPS to Ghostscript)."""


class ImageError(ValueError):
    """An image that cannot be decoded or is too large; the message is safe to show a client."""


def open_image(data: bytes, formats: Sequence[str] = tuple(SIGNATURES)) -> Image.Image:
    """Read an image's header (its pixels are decoded later, by `image_to_input`), refusing one whose
    first bytes are not of an allowed format or that has more than MAX_IMAGE_PIXELS pixels."""
    if not data:
        raise ImageError("empty image body")
    kind = next((f for f in formats if data.startswith(SIGNATURES[f])), None)
    if kind is None:
        raise ImageError(f"not an image of an accepted format ({', '.join(f.upper() for f in formats)})")
    try:
        img = Image.open(io.BytesIO(data), formats=[kind.upper()])
    except UnidentifiedImageError:
        raise ImageError(f"cannot decode image: not a valid {kind.upper()} file") from None
    except DECODE_ERRORS as e:
        raise ImageError(f"cannot decode image: {e}") from None
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise ImageError(f"image of {img.width}x{img.height} pixels exceeds {MAX_IMAGE_PIXELS} pixels")
    return img


def image_to_input(img: Image.Image, spec: InputSpec) -> FloatArray:
    """Convert colour mode, resize to the input size, scale and normalise; returns (C, H, W) float32."""
    _, height, width = spec.shape
    try:
        img.load()
    except DECODE_ERRORS as e:
        raise ImageError(f"cannot decode image: {e}") from None
    if img.mode in ("RGBA", "LA", "P") and spec.color_mode == "L":
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    try:
        img = img.convert(spec.color_mode)
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BILINEAR)
    except DECODE_ERRORS as e:
        raise ImageError(f"cannot convert a {img.mode} image to {spec.color_mode}: {e}") from None
    one: FloatArray = normalise(np.asarray(img)[None], spec)[0]
    return one


def normalise(pixels: npt.NDArray[np.uint8], spec: InputSpec) -> FloatArray:
    """Pixels (N, H, W) or (N, H, W, C) of the input's size → inputs (N, C, H, W): scale, then (x − mean) / std."""
    channels, height, width = spec.shape
    x = np.asarray(pixels, dtype=np.float32) * spec.scale
    x = (x - spec.mean) / spec.std
    inputs: FloatArray = x.reshape(len(x), height, width, channels).transpose(0, 3, 1, 2).copy()
    return inputs
