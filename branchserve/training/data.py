"""Datasets: what every source fills in, and Fashion-MNIST held in memory (a folder of images is
streamed from disk by `folders.py`; `sources.py` loads whichever a run names).

Every split is fixed by a seed, so validation (which calibrates exits later) and test (which is
never used for a choice) stay the same across runs, presets and machines. A loaded dataset keeps
its `DataSource`, which a run records so that export loads the very same splits again. Images
become inputs through `repo/imaging.py`, the server's own conversion, at whatever size and colour
the input spec says.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from branchserve.fmnist import LABELS as FMNIST_LABELS
from branchserve.fmnist import fmnist_dir, read_split, split_indices
from branchserve.repo.imaging import image_to_pixels, normalise
from branchserve.repo.manifest import InputSpec
from branchserve.training.config import DataSource

FMNIST_INPUT = InputSpec(shape=(1, 28, 28), color_mode="L", mean=(0.2860,), std=(0.3530,))
"""Fashion-MNIST at its own size, with its published mean and std (the shipped model's input)."""
COLOR_MODES = {"grey": "L", "rgb": "RGB"}


class Samples(Protocol):
    """A split of labelled images, in memory (`Split`) or on disk (`folders.FolderSplit`)."""

    y: Tensor

    def __len__(self) -> int: ...
    def head(self, n: int | None) -> Samples: ...
    def batches(self, batch_size: int, order: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]: ...
    def loaded(self) -> Split: ...


@dataclass
class Split:
    x: Tensor  # (N, C, H, W) float32, normalised
    y: Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int | None) -> Split:
        return self if n is None else Split(self.x[:n], self.y[:n])

    def batches(self, batch_size: int, order: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) of `batch_size` samples at a time, in `order` (default: as stored)."""
        for i in range(0, len(self), batch_size):
            if order is None:
                yield self.x[i : i + batch_size], self.y[i : i + batch_size]
            else:
                idx = order[i : i + batch_size]
                yield self.x[idx], self.y[idx]

    def loaded(self) -> Split:
        return self


@dataclass
class Dataset:
    name: str
    labels: list[str]
    input: InputSpec
    train: Samples
    val: Samples
    test: Samples
    source: DataSource | None = None
    """None for a dataset made in memory, which no source reproduces."""
    notes: dict[str, Any] = field(default_factory=dict)
    """What loading found out (a folder's layout, files left out, what the statistics were computed on)."""

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "train": len(self.train), "val": len(self.val), "test": len(self.test)}


def provisional_spec(size: int, color: str, resize: str = "stretch") -> InputSpec:
    """An input spec whose statistics are still to be measured (mean 0, std 1: inputs are scaled pixels)."""
    channels = 3 if color == "rgb" else 1
    return InputSpec.model_validate(
        {
            "shape": (channels, size, size),
            "color_mode": COLOR_MODES[color],
            "resize": resize,
            "mean": (0.0,) * channels,
            "std": (1.0,) * channels,
        }
    )


def pixel_sums(pixels: np.ndarray, chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel sums of (..., C) uint8 pixels and of their squares, exact in int64 (a chunk at a
    time, so memory stays small), and the number of pixels."""
    flat = pixels.reshape(-1, pixels.shape[-1])
    total, squares = np.zeros(flat.shape[1], np.int64), np.zeros(flat.shape[1], np.int64)
    for i in range(0, len(flat), chunk):
        part = flat[i : i + chunk].astype(np.int64)
        total += part.sum(0)
        squares += (part * part).sum(0)
    return total, squares, len(flat)


def with_statistics(spec: InputSpec, total: np.ndarray, squares: np.ndarray, count: int) -> InputSpec:
    """`spec` with each channel's mean and std of scaled pixels, from `pixel_sums` over the training images."""
    mean = total * spec.scale / count
    std = np.sqrt(np.maximum(squares * spec.scale**2 / count - mean**2, 0.0))
    return spec.model_copy(
        update={"mean": tuple(round(float(m), 6) for m in mean), "std": tuple(round(float(s), 6) or 1.0 for s in std)}
    )


def load_fashion_mnist(
    root: Path | None = None,
    n_val: int = 10_000,
    split_seed: int = 0,
    source: DataSource | None = None,
    spec: InputSpec | None = None,
) -> Dataset:
    """Fashion-MNIST from `root` (default: `fmnist_dir()`), its training set cut into train and
    validation. At 28×28 grey it keeps its published statistics; at another size or colour each
    image is converted as the server converts an upload, and the statistics are measured on train."""
    root = root or fmnist_dir()
    source = source or DataSource(kind="fashion-mnist", path=root.resolve(), split_seed=split_seed)
    source = source.model_copy(update={"path": root.resolve()})
    (x, y), (xt, yt) = read_split("train", root), read_split("test", root)
    tr, va = split_indices(len(y), n_val, split_seed)
    size, color = source.image_size or 28, source.color or "grey"
    if spec is None and (size, color) == (28, "grey"):
        spec = FMNIST_INPUT
    convert = spec or provisional_spec(size, color, source.resize)
    x, xt = _pixels(x, convert), _pixels(xt, convert)
    if spec is None:
        spec = with_statistics(convert, *pixel_sums(x[tr]))

    def split(xs: np.ndarray, ys: np.ndarray) -> Split:
        return Split(torch.from_numpy(normalise(xs, spec)), torch.from_numpy(ys))

    return Dataset(
        "fashion-mnist", FMNIST_LABELS, spec, split(x[tr], y[tr]), split(x[va], y[va]), split(xt, yt), source
    )


def _pixels(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(N, 28, 28) uint8 → (N, H, W, C) uint8 at the spec's size and colour, image by image as an upload."""
    if spec.shape == (1, *images.shape[1:]) and spec.color_mode == "L":
        return images[..., None]
    return np.stack([image_to_pixels(Image.fromarray(image), spec) for image in images])


def augment(x: Tensor, generator: torch.Generator, pad: int = 1) -> Tensor:
    """Random shifts of up to `pad` pixels and horizontal flips, drawn from `generator`."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    out = shifted.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)
