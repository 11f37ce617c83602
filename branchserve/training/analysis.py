"""Layer-wise representation metrics: linear-probe accuracy, class separation R² and linear CKA.

The metrics are pure functions of feature matrices (samples × features), so they can be tested on
constructed cases; `analyze_model` applies them to the output of every backbone block of a model.
Features are taken on a fixed subset of validation images: its first half trains the probes, its
second half scores them, and R² and CKA use all of it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor
from tqdm import tqdm

from branchserve.training.config import AnalysisSettings
from branchserve.training.data import Split
from branchserve.training.model import BranchedNet
from branchserve.training.train import SUMMARY, load_model


class LayerMetrics(BaseModel):
    block: int
    channels: int
    resolution: int
    probe_accuracy: float
    r2: float


class ModelAnalysis(BaseModel):
    run: str
    exits: list[int]
    test_accuracy: list[float] | None = None
    layers: list[LayerMetrics]
    probe_auc: float
    cka: list[list[float]] = Field(description="linear CKA between this model's blocks")


class Analysis(BaseModel):
    settings: AnalysisSettings
    model: ModelAnalysis
    reference: ModelAnalysis | None = None
    cross_cka: list[list[float]] | None = Field(None, description="CKA of model block i (rows) with reference block j")


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al., 2019) in its feature-space form, O(n·d²) rather than O(n²).

    CKA = ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on column-centred X (n×d1) and Y (n×d2).
    """
    if len(x) != len(y):
        raise ValueError(f"CKA needs the same samples in both representations, got {len(x)} and {len(y)}")
    x = np.asarray(x, np.float64) - np.mean(x, axis=0)
    y = np.asarray(y, np.float64) - np.mean(y, axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / norm) if norm > 0 else 0.0


def cka_matrix(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> np.ndarray:
    return np.array([[linear_cka(x, y) for y in ys] for x in xs])


def class_separation_r2(x: np.ndarray, labels: np.ndarray) -> float:
    """R² = 1 − d̄_within / d̄_total with cosine distance d (Kornblith et al., 2021).

    Averages are class-balanced as in the paper: d̄_within over same-class pairs of each class, then
    over classes; d̄_total over pairs of every class pair, then over class pairs. Since the mean cosine
    similarity between two sets of unit vectors is the dot product of their means, both averages come
    from the K class means of the normalised features, without an n×n matrix.
    """
    x = np.asarray(x, np.float64)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    classes = np.unique(labels)
    means = np.stack([unit[labels == c].mean(axis=0) for c in classes])
    within = 1.0 - float(np.mean(np.sum(means**2, axis=1)))
    total = 1.0 - float(np.sum(means.mean(axis=0) ** 2))
    return 1.0 - within / total if total > 0 else 0.0


def probe_accuracy(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    l2: float = 1e-3,
    iters: int = 200,
) -> float:
    """Held-out accuracy of a multinomial logistic regression on frozen features.

    Features are standardised with the training half's statistics, weights start at zero and full-batch
    L-BFGS minimises a convex loss, so the result is deterministic and needs no learning-rate tuning.
    """
    xtr = torch.as_tensor(np.asarray(x_train), dtype=torch.float64)
    xte = torch.as_tensor(np.asarray(x_test), dtype=torch.float64)
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    ytr = torch.as_tensor(np.asarray(y_train), dtype=torch.int64)
    n_classes = int(max(ytr.max().item(), int(np.max(y_test))) + 1)
    w = torch.zeros(xtr.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (xte @ w + b).argmax(1).numpy()
    return float(np.mean(pred == np.asarray(y_test)))


def probe_auc(accuracies: Sequence[float]) -> float:
    """Area under probe accuracy against normalised depth (block i at i/(L−1)), so it lies in [0, 1]."""
    acc = np.asarray(accuracies, np.float64)
    if len(acc) == 1:
        return float(acc[0])
    return float(np.sum((acc[1:] + acc[:-1]) / 2) / (len(acc) - 1))


def relative_change(new: float, base: float) -> float:
    """(new − base) / |base|; NaN when the base is zero, where no relative change is defined."""
    return (new - base) / abs(base) if base else float("nan")


@torch.no_grad()
def block_features(model: BranchedNet, x: Tensor, pool: int = 1, batch_size: int = 500) -> list[np.ndarray]:
    """Every block's output, average-pooled to pool×pool and flattened: one (n, C·pool²) array per block."""
    was_training = model.training
    model.eval()
    chunks: list[list[Tensor]] = []
    for i in range(0, len(x), batch_size):
        feats = model.features(x[i : i + batch_size])
        chunks.append([F.adaptive_avg_pool2d(f, pool).flatten(1) for f in feats])
    model.train(was_training)
    return [torch.cat(layer).numpy() for layer in zip(*chunks, strict=True)]


def probe_subset(val: Split, settings: AnalysisSettings) -> Split:
    n = settings.probe_train + settings.probe_test
    if len(val) < n:
        raise ValueError(f"validation split has {len(val)} images; probes need {n} (probe-train + probe-test)")
    return val.head(n)


def analyze_model(
    model: BranchedNet,
    subset: Split,
    settings: AnalysisSettings,
    run: str,
    test_accuracy: list[float] | None = None,
    progress: bool = True,
) -> tuple[ModelAnalysis, list[np.ndarray]]:
    """Metrics of every block on `subset`; also returns the features so CKA across models needs no rerun."""
    feats = block_features(model, subset.x, settings.pool)
    labels = subset.y.numpy()
    cut = settings.probe_train
    layers = []
    with torch.no_grad():
        shapes = [f.shape for f in model.features(subset.x[:1])]
    bar = tqdm(zip(feats, shapes, strict=True), total=len(feats), desc=f"probes {run}", disable=not progress)
    for i, (f, shape) in enumerate(bar):
        acc = probe_accuracy(f[:cut], labels[:cut], f[cut:], labels[cut:], settings.probe_l2, settings.probe_iters)
        layers.append(
            LayerMetrics(
                block=i,
                channels=shape[1],
                resolution=shape[2],
                probe_accuracy=acc,
                r2=class_separation_r2(f, labels),
            )
        )
    result = ModelAnalysis(
        run=run,
        exits=list(model.arch.exits),
        test_accuracy=test_accuracy,
        layers=layers,
        probe_auc=probe_auc([m.probe_accuracy for m in layers]),
        cka=cka_matrix(feats, feats).tolist(),
    )
    return result, feats


def test_accuracy_of(run: Path) -> list[float] | None:
    summary = run / SUMMARY
    return json.loads(summary.read_text())["test_accuracy"] if summary.is_file() else None


def compare_runs(
    run: Path,
    val: Split,
    settings: AnalysisSettings,
    against: Path | None = None,
    progress: bool = True,
) -> Analysis:
    """Analyse a trained run and, optionally, a reference run (its unbranched twin) on the same images."""
    subset = probe_subset(val, settings)
    model, _ = load_model(run)
    main, feats = analyze_model(model, subset, settings, run.name, test_accuracy_of(run), progress)
    if against is None:
        return Analysis(settings=settings, model=main)
    ref_model, _ = load_model(against)
    ref, ref_feats = analyze_model(ref_model, subset, settings, against.name, test_accuracy_of(against), progress)
    return Analysis(settings=settings, model=main, reference=ref, cross_cka=cka_matrix(feats, ref_feats).tolist())
