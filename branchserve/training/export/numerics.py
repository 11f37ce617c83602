"""The exported graphs must compute what torch computes, on real images and on a batch of one.

Checked before anything reaches the repository: ORT's full graph and ORT's chain of stage graphs
against the torch model, max |Δ| ≤ 1e-4 and identical argmax on every exit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from branchserve.repo.graphcalls import run_chain
from branchserve.repo.sessions import load_session
from branchserve.training.export import ExportError
from branchserve.training.export.graphs import FULL_FILE, logits_name, stage_file
from branchserve.training.model import BranchedNet

TOLERANCE = 1e-4


@torch.no_grad()
def verify_numerics(model: BranchedNet, folder: Path, n: int, x: Tensor) -> float:
    """ORT (full graph, and the chain of stage graphs) against torch on `x`, and on its first sample
    alone (the batch axis must really be dynamic). Returns the largest |Δ|; raises ExportError."""
    full = load_session(folder / FULL_FILE)
    stages = [load_session(folder / stage_file(k)) for k in range(n)]
    worst = 0.0
    for batch in (x, x[:1]):
        expected = [z.numpy() for z in model(batch)]
        x_np = batch.numpy()
        runs = {
            "full graph": full.run([logits_name(k) for k in range(n)], {full.get_inputs()[0].name: x_np}),
            "stage chain": run_chain(stages, x_np),
        }
        for what, got in runs.items():
            for k in range(n):
                diff = float(np.abs(got[k] - expected[k]).max())
                worst = max(worst, diff)
                if diff > TOLERANCE:
                    raise ExportError(f"ORT {what}, exit {k}: max |Δ| {diff:.2e} from torch exceeds {TOLERANCE}")
                flips = int((got[k].argmax(1) != expected[k].argmax(1)).sum())
                if flips:
                    raise ExportError(f"ORT {what}, exit {k}: {flips} of {len(batch)} predictions differ from torch")
    return worst
