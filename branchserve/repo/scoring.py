"""Every exit's logits for a batch of inputs, from a version's full graph (the graph export checked
against the stage chain), in ONNX Runtime: what certification and the benches score, torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt

from branchserve.repo.frontier import ExitScores
from branchserve.repo.imaging import normalise
from branchserve.repo.manifest import Manifest
from branchserve.repo.sessions import RUN_OPTIONS, load_session
from branchserve.repo.tensors import FloatArray

BATCH = 500


def exit_logits(version_dir: Path, manifest: Manifest, images: npt.NDArray[np.uint8], batch: int = BATCH) -> FloatArray:
    """(exits, samples, classes) logits of raw (samples, H, W) grey images of the input's size."""
    inputs = normalise(images[..., None], manifest.input)
    full = manifest.full_graph
    session = load_session(version_dir / full.file)
    chunks = [
        cast(list[FloatArray], session.run(full.logits_outputs, {full.input_name: inputs[i : i + batch]}, RUN_OPTIONS))
        for i in range(0, len(inputs), batch)
    ]
    return np.stack([np.concatenate([c[k] for c in chunks]) for k in range(len(full.logits_outputs))])


def exit_scores(
    version_dir: Path, manifest: Manifest, images: npt.NDArray[np.uint8], labels: npt.NDArray[np.int64]
) -> ExitScores:
    """Every exit's confidence, correctness and agreement with the final exit on raw (N, H, W) grey images of
    the input's size."""
    logits = exit_logits(version_dir, manifest, images)
    return ExitScores.from_logits(list(logits), labels, manifest.confidence)
