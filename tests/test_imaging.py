"""The one image conversion (repo/imaging.py) and the input spec it follows: per-channel
normalisation, the resize policies, transparency, and version-1 manifests still loading."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from branchserve.repo.imaging import ImageError, Png, image_to_input, image_to_pixels, open_image
from branchserve.repo.loading import load_version
from branchserve.repo.manifest import MANIFEST_FILE, SCHEMA_VERSION, InputSpec, RepositoryError

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "fmnist-resnet" / "3"


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def rgb_spec(size: int, resize: str = "stretch") -> InputSpec:
    return InputSpec.model_validate(
        {
            "shape": (3, size, size),
            "color_mode": "RGB",
            "resize": resize,
            "mean": (0.5, 0.25, 0.125),
            "std": (0.5, 0.25, 2.0),
        }
    )


def test_each_channel_has_its_own_mean_and_std() -> None:
    colour = (200, 100, 20)
    x = image_to_input(open_image(png(Image.new("RGB", (7, 5), colour))), rgb_spec(4))
    assert x.shape == (3, 4, 4) and x.dtype == np.float32
    for c, (value, mean, std) in enumerate(zip(colour, (0.5, 0.25, 0.125), (0.5, 0.25, 2.0), strict=True)):
        np.testing.assert_allclose(x[c], (value / 255 - mean) / std, rtol=1e-6)


def test_stretch_keeps_everything_and_center_crop_keeps_the_middle() -> None:
    """A 120×40 image, red on the outer thirds and green in the middle third: stretched to 12×12
    the red stays at the sides; cropped, the 40×40 centre is all that is left, and it is green
    (but for the resampling filter's reach over the crop's edge into the red)."""
    pixels = np.zeros((40, 120, 3), np.uint8)
    pixels[:, :40] = pixels[:, 80:] = (255, 0, 0)
    pixels[:, 40:80] = (0, 255, 0)
    image = png(Image.fromarray(pixels))
    stretched = image_to_pixels(open_image(image), rgb_spec(12))
    cropped = image_to_pixels(open_image(image), rgb_spec(12, "center-crop"))
    assert stretched.shape == cropped.shape == (12, 12, 3)
    assert (stretched[:, 0] == (255, 0, 0)).all() and (stretched[:, 6] == (0, 255, 0)).all()
    assert (cropped[:, 1:-1] == (0, 255, 0)).all() and cropped[..., 0].max() < 64
    tall = image_to_pixels(
        open_image(png(Image.fromarray(pixels.transpose(1, 0, 2).copy()))), rgb_spec(12, "center-crop")
    )
    assert (tall[1:-1] == (0, 255, 0)).all() and tall[..., 0].max() < 64  # the same along the other axis


def pillow_only(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("mode", ["L", "RGB", "LA", "RGBA", "P", "I;16", "1"])
@pytest.mark.parametrize("size", [6, 9])
@pytest.mark.parametrize("interlaced", [False, True])
def test_libspng_and_pillow_give_the_same_input(mode: str, size: int, interlaced: bool) -> None:
    """8-bit grey and RGB PNGs take libspng (`Png`), the rest Pillow; every one converts to the same
    bits as through Pillow alone, into a grey and an RGB input, at its size and resized."""
    rng = np.random.default_rng(size)
    source = Image.fromarray(rng.integers(0, 256, (size, size, 4), dtype=np.uint8), "RGBA")
    buf = io.BytesIO()
    source.convert(mode).save(buf, format="PNG", interlace=interlaced)
    data = buf.getvalue()
    assert isinstance(open_image(data), Png) == (mode in ("L", "RGB"))
    grey = InputSpec(shape=(1, 6, 6), color_mode="L", mean=(0.5,), std=(0.25,))
    for spec in (grey, rgb_spec(6), rgb_spec(4, "center-crop")):
        assert (image_to_input(open_image(data), spec) == image_to_input(pillow_only(data), spec)).all()


def test_a_damaged_png_is_refused_or_decodes_to_its_own_pixels() -> None:
    """Truncated, or any byte after the signature changed (header, pixels, checksums, chunk types):
    refused (ImageError), or, where Pillow reads what is left, the original pixels; never others."""
    data = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)))
    grey = InputSpec(shape=(1, 8, 8), color_mode="L", mean=(0.0,), std=(1.0,))
    original = image_to_input(open_image(data), grey)
    damaged = [data[:cut] for cut in range(8, len(data))]
    for at in range(8, len(data)):
        flipped = bytearray(data)
        flipped[at] ^= 0x55
        damaged.append(bytes(flipped))
    refused = 0
    for image in damaged:
        try:
            x = image_to_input(open_image(image), grey)
        except ImageError:
            refused += 1
            continue
        assert (x == original).all()
    assert refused > len(damaged) * 0.8  # Pillow reads some: cuts in the pixel data's CRC or IEND, a bad IEND


def text_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_only_small_plain_pngs_take_libspng() -> None:
    """Larger than 256×256 (libspng holds the GIL while it decodes), or carrying a compressed text
    chunk (libspng would inflate it whole: here 16 MiB of zeros in 16 KiB), the PNG takes Pillow,
    which stops inflating text at 1 MiB and refuses the bomb."""
    small = png(Image.new("L", (256, 256), 7))
    assert isinstance(open_image(small), Png)
    assert not isinstance(open_image(png(Image.new("L", (257, 256), 7))), Png)
    bomb = text_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(bytes(16 << 20), 9))
    with_text = small[:33] + bomb + small[33:]  # after IHDR
    assert len(with_text) < 64 << 10 and Png.read(with_text) is None
    with pytest.raises(ImageError, match="too large"):
        open_image(with_text)


def test_transparency_is_black_in_every_colour_mode() -> None:
    clear = png(Image.new("RGBA", (6, 6), (250, 10, 10, 0)))
    grey = InputSpec(shape=(1, 6, 6), color_mode="L", mean=(0.0,), std=(1.0,))
    assert (image_to_pixels(open_image(clear), rgb_spec(6)) == 0).all()
    assert (image_to_pixels(open_image(clear), grey) == 0).all()


def test_a_stack_normalises_as_its_images_do() -> None:
    from branchserve.repo.imaging import normalise

    spec = rgb_spec(5)
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    stacked = normalise(pixels, spec)
    assert stacked.shape == (4, 3, 5, 5)
    for i in range(4):
        assert np.array_equal(stacked[i], normalise(pixels[i], spec))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"shape": (3, 8, 8), "color_mode": "RGB", "mean": (0.5,), "std": (0.5,)}, "one mean and one std per channel"),
        ({"shape": (1, 8, 8), "color_mode": "RGB", "mean": (0.5,), "std": (0.5,)}, "RGB has 3 channels"),
        ({"shape": (1, 8, 8), "color_mode": "L", "mean": (0.5,), "std": (0.0,)}, "std must be positive"),
        ({"shape": (1, 8, 8), "color_mode": "L", "mean": (0.5,), "std": (1.0,), "resize": "fit"}, "stretch"),
    ],
)
def test_an_inconsistent_input_spec_is_refused(spec: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        InputSpec.model_validate(spec)


def test_the_shipped_version_1_manifest_loads_as_version_2_and_converts_as_before(tmp_path: Path) -> None:
    doc = json.loads((SHIPPED / MANIFEST_FILE).read_text())
    assert doc["schema_version"] == 1 and doc["input"]["mean"] == 0.286  # the file on disk is version 1
    manifest = load_version(SHIPPED)
    assert manifest.schema_version == SCHEMA_VERSION == 2
    assert (manifest.input.mean, manifest.input.std, manifest.input.resize) == ((0.286,), (0.353,), "stretch")
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    x = image_to_input(open_image(png(Image.fromarray(pixels))), manifest.input)
    version_1 = (pixels.astype(np.float32) * np.float32(1 / 255) - np.float32(0.286)) / np.float32(0.353)
    assert np.array_equal(x[0], version_1)

    copy = tmp_path / "fmnist-resnet" / "3"
    shutil.copytree(SHIPPED, copy)
    doc["input"]["mean"] = [0.1, 0.2]  # a version-1 manifest is still checked after migrating
    (copy / MANIFEST_FILE).write_text(json.dumps(doc))
    with pytest.raises(RepositoryError, match=r"invalid manifest at 'input\."):
        load_version(copy)
