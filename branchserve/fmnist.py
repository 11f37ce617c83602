"""Fashion-MNIST: where its IDX files live, its labels, its validation split, and a reader that needs numpy only.

One home for the dataset's location: `BRANCHSERVE_FMNIST_DIR`, else Debian's
`dataset-fashion-mnist` package. Every command that reads the dataset (train, export, analyze,
study, the load-test samples, the benches and the tests) asks `fmnist_dir()`.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt

ENV_VAR = "BRANCHSERVE_FMNIST_DIR"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DataError(RuntimeError):
    """A dataset that is missing or malformed; the message says what to install or fix."""


def fmnist_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or SYSTEM_DIR)


def read_idx(path: Path) -> npt.NDArray[np.uint8]:
    """Parse one gzipped IDX file (the MNIST family's format) into an array."""
    if not path.is_file():
        raise DataError(
            f"{path} not found: install it with 'apt-get install -y dataset-fashion-mnist' "
            f"or point {ENV_VAR} (or --fmnist-dir) at a folder holding its .gz files"
        )
    try:
        raw = gzip.decompress(path.read_bytes())
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(dims)):
            raise ValueError(f"header says {dims} but holds {data.size} values")
    except (OSError, EOFError, struct.error, ValueError) as e:
        raise DataError(f"{path} is corrupt ({e}); reinstall dataset-fashion-mnist") from None
    return data.reshape(dims)


def read_split(part: str, root: Path | None = None) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Images (N, 28, 28) and labels (N,) of the `train` or `test` part."""
    root = root or fmnist_dir()
    images, labels = (read_idx(root / name) for name in FILES[part])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (len(images),):
        raise DataError(f"{root}: {part} images {images.shape} and labels {labels.shape} do not fit together")
    return images, labels.astype(np.int64)


def split_indices(n: int, n_val: int, seed: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """A seeded permutation cut into (train, val): training holds validation out of the training set with it,
    and certification (torch-free) finds the same validation images with it."""
    if not 0 < n_val < n:
        raise DataError(f"cannot hold out {n_val} of {n} samples for validation")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def read_validation(
    root: Path | None = None, n_val: int = 10_000, seed: int = 0
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """The validation images and labels a run with this split seed held out of the training part."""
    images, labels = read_split("train", root)
    _, val = split_indices(len(labels), n_val, seed)
    return images[val], labels[val]
