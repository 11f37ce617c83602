"""Array types shared by the contract, training's exports and the server (numpy's, with their dtype)."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

FloatT = TypeVar("FloatT", bound=np.floating)
"""The float dtype a function keeps: float32 (the graphs' and the server's) or float64 (the threshold search's)."""
