"""Re-measure a version's stage latency on this host, re-price its frontier, and (re-)certify it.

Which points exist and which is the default were chosen at export on validation accuracy and
MACs, which no host changes; only their latency figures are re-measured here. Certification
scores the validation split again with the version's own full graph (onnxruntime, no torch):
the same halves and proposals as the export's search, so an exported version gains the counts
export would have recorded (see branchserve/repo/certify.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from branchserve.fmnist import DataError, read_split, read_validation
from branchserve.repo.certify import Target, certify
from branchserve.repo.frontier import ExitScores, SearchSettings, priced
from branchserve.repo.loading import load_version
from branchserve.repo.manifest import MANIFEST_FILE, Manifest, RepositoryError
from branchserve.repo.profiling import cost_profile
from branchserve.repo.scoring import exit_scores


def remeasure_latency(
    m: Manifest, version_dir: Path, batch_sizes: Sequence[int], runs: int, progress: bool
) -> Manifest:
    """The manifest with a cost profile measured on this host and every point re-priced with it."""
    cost = cost_profile(
        [version_dir / s.file for s in m.stages],
        version_dir / m.full_graph.file,
        m.input.shape,
        batch_sizes,
        runs,
        progress,
    )
    batch1, cert = cost.at_batch(1), m.certification
    if cert is not None:
        cert = cert.model_copy(update={"points": [priced(p, batch1) for p in cert.points]})
    frontier = [priced(p, batch1) for p in m.frontier]
    return m.model_copy(update={"cost": cost, "frontier": frontier, "certification": cert})


def calibration_scores(m: Manifest, version_dir: Path, fmnist_root: Path | None) -> tuple[ExitScores, ExitScores]:
    """Every exit's scores on the validation split the version was calibrated on, checked against the exits'
    recorded validation accuracy, and on the test split (reported beside certification's points)."""
    data = m.provenance.get("data")
    if not isinstance(data, dict) or data.get("name") != "fashion-mnist":
        raise RepositoryError(
            f"{version_dir}: certifying here reads Fashion-MNIST only; this version was calibrated on other data "
            "(its export certifies it)"
        )
    try:
        val_images, val_labels = read_validation(fmnist_root, int(data["val"]), int(data.get("split_seed", 0)))
        test_images, test_labels = read_split("test", fmnist_root)
    except DataError as e:
        raise RepositoryError(str(e)) from None
    val = exit_scores(version_dir, m, val_images, val_labels)
    measured, recorded = val.correct.mean(axis=1), np.array([e.val_accuracy for e in m.exits])
    if np.abs(measured - recorded).max() > 2 / len(val_labels):
        raise RepositoryError(
            f"{version_dir}: exits score {np.round(measured, 4).tolist()} on this validation split, "
            f"but the manifest records {np.round(recorded, 4).tolist()}: not the split it was calibrated on"
        )
    return val, exit_scores(version_dir, m, test_images, test_labels)


def recertify(m: Manifest, version_dir: Path, targets: Sequence[Target], fmnist_root: Path | None) -> Manifest:
    """The manifest with certification counts from its validation split, and `targets` certified."""
    export = m.provenance.get("export")
    search = export.get("search") if isinstance(export, dict) else None
    settings = SearchSettings(**{**search, "offsets": tuple(search["offsets"])}) if search else SearchSettings()
    macs = [float(s.backbone_macs + s.head_macs) for s in m.stages]
    val, test = calibration_scores(m, version_dir, fmnist_root)
    cert = certify(val, test, macs, settings, m.frontier, m.cost.at_batch(1), targets)
    return m.model_copy(update={"certification": cert})


def calibrate(
    version_dir: Path,
    batch_sizes: Sequence[int],
    runs: int,
    progress: bool = True,
    *,
    latency: bool = True,
    targets: Sequence[Target] | None = None,
    fmnist_root: Path | None = None,
) -> Manifest:
    """Re-measure latency (unless `latency` is False) and certify `targets` (when given); rewrite manifest.json."""
    m = load_version(version_dir)
    if latency:
        m = remeasure_latency(m, version_dir, batch_sizes, runs, progress)
    if targets is not None:
        m = recertify(m, version_dir, targets, fmnist_root)
    tmp = version_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(m.model_dump_json(indent=2) + "\n")
    tmp.replace(version_dir / MANIFEST_FILE)
    return load_version(version_dir)
