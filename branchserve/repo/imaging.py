"""Turn an image into a model input: the one conversion both the server and training's datasets run.

`image_to_pixels` makes the image the model's size and colour (uint8, what the per-channel
statistics are computed on); `normalise` scales it and subtracts each channel's mean.

A small 8-bit grey or RGB PNG (no palette, no alpha, no 16-bit samples, nothing but plain
chunks) is decoded by libspng (`Png`), everything else by Pillow: on a 28×28 upload Pillow's open
and load took ~26 µs of a request's ~0.5 ms, libspng ~8 µs. The pixels are the same bits either way (PNG is lossless and
such a PNG needs no conversion); resizing and colour conversion stay Pillow's.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyspng
from PIL import Image, UnidentifiedImageError

from branchserve.repo.manifest import InputSpec
from branchserve.repo.tensors import FloatArray

Image.init()  # import Pillow's format plugins now: on a server's first request they took 15–30 ms, so admission shed it

MAX_IMAGE_PIXELS = 4096 * 4096
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises on bad data
SIGNATURES = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}
"""The formats an image may have, by their first bytes; Pillow's plugin names are the upper-case keys.
Anything else is refused before a decoder runs: Pillow reads dozens of formats, some of which decode
inside `Image.open` (an ICO's embedded PNG) or hand the data to other programs (EPS to Ghostscript)."""
ALPHA_MODES = ("RGBA", "LA", "PA", "P")
"""Modes that may carry transparency: composited on black first, so a transparent area is black in
every colour mode (converting RGBA to RGB would otherwise keep whatever colour hides behind it)."""

PixelArray = npt.NDArray[np.uint8]
PNG_HEADER = struct.Struct(">8sI4sIIBB")
"""Signature, IHDR's length and type, width, height, bit depth, colour type: a PNG's first 26 bytes."""
PNG_CHUNK = struct.Struct(">I4s")  # a chunk's length and type; its data and a CRC of type and data follow
PNG_MODES = {0: "L", 2: "RGB"}  # colour types libspng decodes here, as Pillow's modes
SPNG_MAX_PIXELS = 256 * 256
"""libspng holds the GIL while it decodes (pyspng does not release it): only images this small, which
the server decodes on its event loop anyway, take it; larger ones take Pillow, which releases it."""
SPNG_CHUNKS = frozenset({b"IHDR", b"IDAT", b"IEND", b"gAMA", b"sRGB", b"pHYs", b"cHRM", b"sBIT", b"tIME", b"bKGD"})
"""The chunks a PNG may hold to take libspng: small fixed-size ones. libspng inflates text and ICC
chunks whole (up to 64 MiB each as pyspng sets it), where Pillow stops at 1 MiB."""


class ImageError(ValueError):
    """An image that cannot be decoded or is too large; the message is safe to show a client."""


@dataclass(frozen=True)
class Png:
    """An 8-bit grey or RGB PNG, its header read: libspng decodes it (`pixels`)."""

    data: bytes
    width: int
    height: int
    mode: str

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @classmethod
    def read(cls, data: bytes) -> Png | None:
        """A PNG libspng decodes here, every chunk's CRC checked (ImageError if one is wrong); None
        for any other image, which takes Pillow's way: another mode or depth, more than
        SPNG_MAX_PIXELS, a chunk outside SPNG_CHUNKS, or no whole IEND chunk."""
        if len(data) < PNG_HEADER.size:
            return None
        signature, length, chunk, width, height, depth, colour = PNG_HEADER.unpack_from(data)
        if signature != SIGNATURES["png"] or (length, chunk) != (13, b"IHDR") or depth != 8 or colour not in PNG_MODES:
            return None
        if width * height > SPNG_MAX_PIXELS or not _plain_chunks(data):
            return None
        return cls(data, width, height, PNG_MODES[colour])

    def pixels(self) -> PixelArray:
        """(height, width) grey or (height, width, 3) RGB uint8, as Pillow's `np.asarray` of it."""
        try:
            return np.asarray(pyspng.load(self.data, self.mode), np.uint8)
        except RuntimeError as e:  # libspng's errors: malformed data
            raise ImageError(f"cannot decode image: {e}") from None


def _plain_chunks(png: bytes) -> bool:
    """Whether a PNG is whole up to IEND and holds only SPNG_CHUNKS; a chunk whose CRC is wrong is an
    ImageError. pyspng has libspng use data whatever its CRC, so damaged pixel data would decode to
    other pixels: checked here (Pillow skips the pixel data's CRCs and relies on zlib's checks)."""
    data, at = memoryview(png), len(SIGNATURES["png"])
    while at + PNG_CHUNK.size <= len(data):
        length, kind = PNG_CHUNK.unpack_from(data, at)
        end = at + PNG_CHUNK.size + length
        if end + 4 > len(data):
            return False
        if zlib.crc32(data[at + 4 : end]) != int.from_bytes(data[end : end + 4], "big"):
            raise ImageError(f"cannot decode image: bad CRC in a {kind.decode('latin-1')} chunk")
        if kind not in SPNG_CHUNKS:
            return False
        if kind == b"IEND":
            return True
        at = end + 4
    return False


OpenedImage = Image.Image | Png


def open_image(data: bytes, formats: Sequence[str] = tuple(SIGNATURES)) -> OpenedImage:
    """Read an image's header (its pixels are decoded later, by `image_to_input`), refusing one whose
    first bytes are not of an allowed format or that has more than MAX_IMAGE_PIXELS pixels."""
    if not data:
        raise ImageError("empty image body")
    kind = next((f for f in formats if data.startswith(SIGNATURES[f])), None)
    if kind is None:
        raise ImageError(f"not an image of an accepted format ({', '.join(f.upper() for f in formats)})")
    if (png := Png.read(data)) is not None:
        return png
    try:
        img = Image.open(io.BytesIO(data), formats=[kind.upper()])
    except UnidentifiedImageError:
        raise ImageError(f"cannot decode image: not a valid {kind.upper()} file") from None
    except DECODE_ERRORS as e:
        raise ImageError(f"cannot decode image: {e}") from None
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise ImageError(f"image of {img.width}x{img.height} pixels exceeds {MAX_IMAGE_PIXELS} pixels")
    return img


def _resized(img: Image.Image, spec: InputSpec) -> Image.Image:
    """`stretch` resamples the whole image to the input size; `center-crop` resamples only the
    largest centred region of the input's aspect ratio (one resampling: PIL's `box`), which is
    resizing the shorter side to fit and cutting the centre out."""
    _, height, width = spec.shape
    if spec.resize == "stretch":
        return img if img.size == (width, height) else img.resize((width, height), Image.Resampling.BILINEAR)
    w, h = img.size
    if w * height > h * width:  # wider than the input: keep the full height
        crop = h * width / height
        box = ((w - crop) / 2, 0.0, (w + crop) / 2, float(h))
    else:
        crop = w * height / width
        box = (0.0, (h - crop) / 2, float(w), (h + crop) / 2)
    return img.resize((width, height), Image.Resampling.BILINEAR, box=box)


def image_to_pixels(img: OpenedImage, spec: InputSpec) -> PixelArray:
    """Decode, composite transparency on black, convert to the colour mode and resize by the
    spec's policy; returns (height, width, channels) uint8."""
    channels, height, width = spec.shape
    if isinstance(img, Png):
        pixels = img.pixels()
        if img.mode == spec.color_mode and (img.width, img.height) == (width, height):
            return pixels.reshape(height, width, channels)
        img = Image.fromarray(pixels, img.mode)
    try:
        img.load()
    except DECODE_ERRORS as e:
        raise ImageError(f"cannot decode image: {e}") from None
    try:
        if img.mode in ALPHA_MODES:
            img = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img)
        img = _resized(img.convert(spec.color_mode), spec)
    except DECODE_ERRORS as e:
        raise ImageError(f"cannot convert a {img.mode} image to {spec.color_mode}: {e}") from None
    return np.asarray(img, dtype=np.uint8).reshape(height, width, channels)


def normalise(pixels: PixelArray, spec: InputSpec) -> FloatArray:
    """(..., height, width, channels) pixels → (..., channels, height, width) float32: scaled, minus
    each channel's mean, over its std. Elementwise, so a stack of images gets the same bits as each
    image alone."""
    arr = pixels.astype(np.float32)
    arr *= np.float32(spec.scale)  # in place: the same float32 operations, without three temporaries
    arr -= np.asarray(spec.mean, np.float32)
    arr /= np.asarray(spec.std, np.float32)
    if arr.shape[-1] == 1:  # one channel: moving it is a reshape
        return arr.reshape(*arr.shape[:-3], 1, *arr.shape[-3:-1])
    return np.ascontiguousarray(np.moveaxis(arr, -1, -3))


def image_to_input(img: OpenedImage, spec: InputSpec) -> FloatArray:
    """What a model takes for one image: `normalise(image_to_pixels(...))`, (C, H, W) float32."""
    return normalise(image_to_pixels(img, spec), spec)
