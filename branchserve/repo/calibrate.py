"""Re-measure a version's stage latency on this host and re-price its frontier.

Which points exist and which is the default were chosen at export on validation accuracy and
MACs, which no host changes; only their latency figures are re-measured here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from branchserve.repo.frontier import priced
from branchserve.repo.loading import load_version
from branchserve.repo.manifest import MANIFEST_FILE, Manifest
from branchserve.repo.profiling import cost_profile


def calibrate(version_dir: Path, batch_sizes: Sequence[int], runs: int, progress: bool = True) -> Manifest:
    """Re-measure the cost profile on this host, re-price every point, rewrite manifest.json."""
    m = load_version(version_dir)
    cost = cost_profile(
        [version_dir / s.file for s in m.stages],
        version_dir / m.full_graph.file,
        m.input.shape,
        batch_sizes,
        runs,
        progress,
    )
    m = m.model_copy(update={"cost": cost, "frontier": [priced(p, cost.at_batch(1)) for p in m.frontier]})
    tmp = version_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(m.model_dump_json(indent=2) + "\n")
    tmp.replace(version_dir / MANIFEST_FILE)
    return load_version(version_dir)
