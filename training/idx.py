"""The MNIST family's gzipped IDX files, read with numpy alone so torch-free tools can use them too."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


class DataError(RuntimeError):
    """A dataset that is missing or malformed; the message says what to install or fix."""


def read_idx(path: Path) -> np.ndarray:
    """Parse one gzipped IDX file (the MNIST family's format) into an array."""
    if not path.is_file():
        raise DataError(
            f"{path} not found: install it with 'apt-get install -y dataset-fashion-mnist' or pass --fmnist-dir"
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
