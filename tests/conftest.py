"""Shared fixtures: a tiny branched model trained on a small real subset of Fashion-MNIST, and its
export into a model repository. Session-scoped, so every test file (export, repository, server,
analysis) pays for training and export once."""

from __future__ import annotations

from pathlib import Path

import pytest

from branchserve.training.config import ArchConfig, RegimeConfig
from branchserve.training.data import Dataset, load_fashion_mnist
from branchserve.training.export.calibration import ExportSettings
from branchserve.training.export.publish import export_run
from branchserve.training.train import train

TINY_ARCH = ArchConfig(stem_width=8, blocks=((8, 2), (16, 1), (16, 2), (24, 1)), head_conv_width=0, head_pool=2)
"""Four blocks, an exit after each (the progressive preset's equidistant positions): four stages."""
TINY_MODEL = "tiny"


@pytest.fixture(scope="session")
def tiny_data() -> Dataset:
    """Fashion-MNIST with its real split, validation and test cut to 2,000 images each."""
    d = load_fashion_mnist()
    return Dataset(d.name, d.labels, d.input, d.train, d.val.head(2000), d.test.head(2000))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Dataset) -> Path:
    """A finished run folder: progressive preset, 200 steps of batch 64 on 6,400 training images."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = RegimeConfig(epochs=2, finetune_epochs=1, batch_size=64, lr=0.05)
    train(cfg, tiny_data, out, base_arch=TINY_ARCH, train_limit=6400, threads=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path, tiny_data: Dataset) -> Path:
    """A model repository holding `tiny/1`, exported from `tiny_run` with a short latency measurement."""
    repo = tmp_path_factory.mktemp("models")
    settings = ExportSettings(batch_sizes=(1, 4), latency_runs=100)
    export_run(tiny_run, repo, TINY_MODEL, tiny_data, settings=settings, progress=False)
    return repo


@pytest.fixture(scope="session")
def tiny_version(tiny_repo: Path) -> Path:
    """The exported version folder, `tiny_repo/tiny/1` (copy it before changing anything)."""
    return tiny_repo / TINY_MODEL / "1"
