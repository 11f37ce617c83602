"""Datasets held in memory as tensors: Fashion-MNIST from its IDX files, or a folder per class.

Every split is fixed by a seed, so validation (which calibrates exits later) and test (which is
never used for a choice) stay the same across runs, presets and machines. A loaded dataset keeps
its `DataSource`, which a run records so that export loads the very same splits again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from branchserve.fmnist import LABELS as FMNIST_LABELS
from branchserve.fmnist import DataError, fmnist_dir, read_split, split_indices
from branchserve.repo.imaging import ImageError, image_to_input, open_image
from branchserve.repo.manifest import InputSpec
from branchserve.training.config import DataSource

FMNIST_INPUT = InputSpec(shape=(1, 28, 28), color_mode="L", mean=0.2860, std=0.3530)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class Split:
    x: Tensor  # (N, C, H, W) float32, normalised
    y: Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int | None) -> Split:
        return self if n is None else Split(self.x[:n], self.y[:n])


@dataclass
class Dataset:
    name: str
    labels: list[str]
    input: InputSpec
    train: Split
    val: Split
    test: Split
    source: DataSource | None = None
    """None for a dataset made in memory, which no source reproduces."""

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "train": len(self.train), "val": len(self.val), "test": len(self.test)}


def load_data(source: DataSource) -> Dataset:
    if source.kind == "image-folder":
        return load_image_folder(source.path, split_seed=source.split_seed)
    return load_fashion_mnist(source.path, split_seed=source.split_seed)


def _normalise(pixels: np.ndarray, spec: InputSpec) -> Tensor:
    x = torch.from_numpy(pixels.astype(np.float32) * spec.scale)
    return ((x - spec.mean) / spec.std).unsqueeze(1)


def load_fashion_mnist(root: Path | None = None, n_val: int = 10_000, split_seed: int = 0) -> Dataset:
    """Fashion-MNIST from `root` (default: `fmnist_dir()`), its training set cut into train and validation."""
    root = root or fmnist_dir()
    (x, y), (xt, yt) = read_split("train", root), read_split("test", root)
    tr, va = split_indices(len(y), n_val, split_seed)
    spec = FMNIST_INPUT

    def split(xs: np.ndarray, ys: np.ndarray) -> Split:
        return Split(_normalise(xs, spec), torch.from_numpy(ys))

    source = DataSource(kind="fashion-mnist", path=root.resolve(), split_seed=split_seed)
    return Dataset(
        "fashion-mnist", FMNIST_LABELS, spec, split(x[tr], y[tr]), split(x[va], y[va]), split(xt, yt), source
    )


def load_image_folder(
    root: Path,
    spec: InputSpec = FMNIST_INPUT,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
) -> Dataset:
    """One sub-folder per class of PNG/JPEG files of any size and colour, converted like served images."""
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass a folder with one sub-folder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root} has {len(classes)} class folders; need at least 2 (one sub-folder per class)")
    xs, ys = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{root / name} holds no .png/.jpg/.jpeg images")
        for f in files:
            try:
                xs.append(image_to_input(open_image(f.read_bytes()), spec))
            except ImageError as e:
                raise DataError(f"{f}: {e}") from None
            ys.append(label)
    x, y = torch.from_numpy(np.stack(xs)), torch.tensor(ys)
    n = len(y)
    n_test, n_val = max(1, round(n * test_fraction)), max(1, round(n * val_fraction))
    if n - n_test - n_val < 1:
        raise DataError(f"{root}: {n} images are too few to split into train/validation/test")
    perm = torch.from_numpy(np.random.default_rng(split_seed).permutation(n))
    te, va, tr = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    source = DataSource(kind="image-folder", path=root.resolve(), split_seed=split_seed)
    return Dataset(root.name, classes, spec, Split(x[tr], y[tr]), Split(x[va], y[va]), Split(x[te], y[te]), source)


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
