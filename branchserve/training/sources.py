"""The dataset a run's `DataSource` names: Fashion-MNIST held in memory (`data.py`) or a folder of
images streamed from disk (`folders.py`). A module of its own, so that the folder reader, which
builds on `data.py`, and `data.py` do not import each other."""

from __future__ import annotations

from branchserve.repo.manifest import InputSpec
from branchserve.training.config import DataSource
from branchserve.training.data import Dataset, load_fashion_mnist
from branchserve.training.folders import load_image_folder


def load_data(source: DataSource, spec: InputSpec | None = None, workers: int = 0, progress: bool = True) -> Dataset:
    """The dataset `source` names; `spec` (a trained run's) skips working the input spec out again."""
    if source.kind == "image-folder":
        return load_image_folder(source, spec, workers, progress)
    return load_fashion_mnist(source.path, split_seed=source.split_seed, source=source, spec=spec)
