"""Representation metrics on constructed cases, and `analyze` / `study` end to end on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from branchserve.repo.frontier import NEVER, ExitScores
from branchserve.repo.manifest import InputSpec
from branchserve.training import study as study_module
from branchserve.training.analysis import (
    class_separation_r2,
    compare_runs,
    linear_cka,
    probe_accuracy,
    probe_auc,
    relative_change,
)
from branchserve.training.config import (
    PRESETS,
    AnalysisSettings,
    ArchConfig,
    RegimeConfig,
    StudySpec,
    cell_name,
    parse_cell,
    parse_grid,
)
from branchserve.training.data import Dataset, Split
from branchserve.training.report import study_table, write_analysis, write_study
from branchserve.training.study import best_within, frontier, run_study
from branchserve.training.study_stats import Interval, cell_stats
from branchserve.training.train import train

TINY = ArchConfig(
    image_size=12,
    num_classes=4,
    stem_width=4,
    blocks=((8, 2), (8, 1), (16, 2), (16, 1)),
    exits=(3,),
    head_conv_width=0,
    head_pool=1,
)
SETTINGS = AnalysisSettings(probe_train=100, probe_test=100, probe_iters=50)


def blobs(n: int, classes: int, dim: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = np.eye(classes, dim) * 10
    return centres[labels] + spread * rng.standard_normal((n, dim)), labels


def test_cka_of_a_representation_with_itself_is_one() -> None:
    x = np.random.default_rng(0).standard_normal((300, 12))
    assert linear_cka(x, x) == pytest.approx(1.0)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12))
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    assert linear_cka(x, 3.5 * x @ q) == pytest.approx(1.0)
    assert linear_cka(x, x @ q) == pytest.approx(linear_cka(x @ q, x))


def test_cka_of_unrelated_representations_is_small() -> None:
    rng = np.random.default_rng(2)
    assert linear_cka(rng.standard_normal((1000, 8)), rng.standard_normal((1000, 8))) < 0.05


def test_class_separation_is_near_one_for_separated_clusters_and_near_zero_for_shuffled_labels() -> None:
    x, labels = blobs(2000, 4, 16, spread=0.3)
    assert class_separation_r2(x, labels) > 0.95
    shuffled = np.random.default_rng(3).permutation(labels)
    assert abs(class_separation_r2(x, shuffled)) < 0.02


def test_class_separation_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(6)
    x, labels = np.abs(rng.standard_normal((60, 5))), rng.integers(0, 3, 60)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1 - unit @ unit.T
    groups = [labels == c for c in range(3)]
    within = np.mean([d[np.ix_(a, a)].mean() for a in groups])
    total = np.mean([d[np.ix_(a, b)].mean() for a in groups for b in groups])
    assert class_separation_r2(x, labels) == pytest.approx(1 - within / total)


def test_probe_on_linearly_separable_data_is_near_perfect() -> None:
    x, labels = blobs(1000, 4, 16, spread=2.0)
    assert probe_accuracy(x[:500], labels[:500], x[500:], labels[500:]) >= 0.99


def test_probe_on_random_labels_is_near_chance() -> None:
    x = np.random.default_rng(4).standard_normal((1000, 16))
    labels = np.random.default_rng(5).integers(0, 4, 1000)
    assert probe_accuracy(x[:500], labels[:500], x[500:], labels[500:]) < 0.4


def test_probe_auc_and_relative_change() -> None:
    assert probe_auc([0.7, 0.7, 0.7]) == pytest.approx(0.7)
    assert probe_auc([0.0, 1.0]) == pytest.approx(0.5)
    assert relative_change(1.3, 1.0) == pytest.approx(0.3)
    assert np.isnan(relative_change(1.0, 0.0))


def test_frontier_finds_the_cheap_confident_exit_and_keeps_the_full_point() -> None:
    """Exit 0 is sure and right on half the images and unsure and wrong on the rest; exit 1 is always right."""
    n = 400
    sure = np.arange(n) % 2 == 0
    scores = ExitScores(np.stack([np.where(sure, 0.9, 0.3), np.full(n, 0.8)]), np.stack([sure, np.ones(n, bool)]))
    points = frontier(scores, scores, stage_costs=[1.0, 3.0], reference=4.0)
    assert points[-1].thresholds[:-1] == [NEVER] and points[-1].cost == pytest.approx(1.0)
    chosen = best_within(points, budget=0.7)
    assert chosen is not None and chosen.accuracy == pytest.approx(1.0)
    assert chosen.cost == pytest.approx(0.625) and chosen.exit_fractions == pytest.approx([0.5, 0.5])
    assert best_within(points, budget=0.2) is None


def test_parse_grid_and_reproducing_command() -> None:
    grid = parse_grid(["weighting=equal,1:1:2", "finetune-epochs=1,2", "schedule=joint,joint+finetune"])
    assert grid == {
        "weighting": ["equal", [1, 1, 2]],
        "finetune_epochs": [1, 2],
        "schedule": ["joint", "joint+finetune"],
    }
    spec = StudySpec(grid=grid, epochs=4, train_limit=100)
    assert "--grid weighting=equal,1:1:2 finetune_epochs=1,2" in spec.command(Path("out"))
    assert len(spec.cells()) == 8
    with pytest.raises(ValueError, match="not a regime field"):
        parse_grid(["colour=red"])


def test_one_factor_at_a_time_cells_and_their_command() -> None:
    spec = StudySpec(
        vary=parse_grid(["weighting=equal,seed", "positions=0:1:2:7"]),
        extra=[parse_cell(["weighting=seed", "schedule=joint"])],
        fixed=parse_cell(["finetune-epochs=1"]),
        epochs=3,
        seeds=[0, 1, 2],
    )
    # weighting=equal is the preset's own value: the base cell already covers it
    names = [cell_name(c) for c in spec.cells()]
    assert names == ["base", "weighting-seed", "positions-0-1-2-7", "weighting-seed_schedule-joint"]
    assert spec.config({}, 2).finetune_epochs == 1 and spec.config({}, 2).seed == 2
    command = spec.command(Path("out"))
    assert "--vary weighting=equal,seed positions=0:1:2:7 --cell weighting=seed schedule=joint" in command
    assert "--set finetune_epochs=1" in command and "--seeds 0,1,2" in command
    with pytest.raises(ValueError, match="one value per field"):
        parse_cell(["weighting=equal,seed"])
    with pytest.raises(ValueError, match="no cells"):
        StudySpec()


def synthetic(n: int, seed: int) -> Split:
    """Four classes of 12×12 images: a bright 4×4 patch in one quadrant, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, 12, 12, generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = 2 + 6 * (c // 2), 2 + 6 * (c % 2)
        x[i, 0, r : r + 4, col : col + 4] += 2.0
    return Split(x, y)


@pytest.fixture(scope="module")
def data() -> Dataset:
    spec = InputSpec(shape=(1, 12, 12), color_mode="L", mean=(0.0,), std=(1.0,))
    return Dataset("synthetic", ["a", "b", "c", "d"], spec, synthetic(300, 0), synthetic(200, 1), synthetic(200, 2))


def tiny_run(data: Dataset, out: Path, preset: str, **overrides: object) -> Path:
    cfg = RegimeConfig(**{**PRESETS[preset], "epochs": 1, "batch_size": 50, **overrides})
    train(cfg, data, out, base_arch=TINY, train_limit=200, progress=False)
    return out


def test_analyze_end_to_end(data: Dataset, tmp_path: Path) -> None:
    branched = tiny_run(data, tmp_path / "branched", "joint", branches=2)
    plain = tiny_run(data, tmp_path / "plain", "unbranched")
    analysis = compare_runs(branched, data.val, SETTINGS, against=plain, progress=False)
    report = write_analysis(analysis, tmp_path / "report")
    assert report.read_text().startswith("# Representation analysis: branched against plain")
    for name in ("depth.png", "cka.png", "analysis.json"):
        assert (tmp_path / "report" / name).stat().st_size > 1000
    saved = json.loads((tmp_path / "report" / "analysis.json").read_text())
    assert saved["model"]["exits"] == [1, 3] and saved["reference"]["exits"] == [3]
    for model in (analysis.model, analysis.reference):
        assert len(model.layers) == 4
        assert all(0.25 <= m.probe_accuracy <= 1 and -1 < m.r2 < 1 for m in model.layers)
        assert np.allclose(np.diag(model.cka), 1.0)
        assert 0 < model.probe_auc <= 1
    assert np.array(analysis.cross_cka).shape == (4, 4)


def test_study_runs_every_cell_per_seed_and_resumes_without_retraining(
    data: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = StudySpec(
        vary={"weighting": ["equal", "decreasing"], "branches": [1]},
        fixed={"branches": 2, "batch_size": 50},
        preset="joint",
        epochs=1,
        seeds=[0, 1],
        train_limit=200,
        analysis=SETTINGS,
    )
    assert [cell_name(c) for c in spec.cells()] == ["base", "weighting-decreasing", "branches-1"]
    finished: list[int] = []
    results = run_study(
        spec, data, tmp_path, base_arch=TINY, progress=False, after_cell=lambda done: finished.append(len(done))
    )
    assert len(results) == 6 and finished == [1, 2, 3, 4, 5, 6]
    for r in results:
        assert (r.seed, r.config["seed"]) in ((0, 0), (1, 1))
        assert len(r.test_accuracy) == r.config["branches"] and r.final_accuracy == r.test_accuracy[-1]
        assert 0 < r.probe_auc <= 1 and r.frontier[-1].cost == pytest.approx(1.0, abs=0.02)
        assert r.at_budget == best_within(r.frontier, spec.cost_budget)
        run = tmp_path / "cells" / r.name / f"seed-{r.seed}"
        assert r.wall_time_s > json.loads((run / "summary.json").read_text())["wall_time_s"]  # scoring counts too
        # the unbranched twin of the same seed trains first, so every branched run is compared with it
        assert (r.cka_to_unbranched is None) == (r.name == "branches-1")
        assert r.cka_to_unbranched is None or all(0 < c <= 1 + 1e-9 for c in r.cka_to_unbranched)

    stats = cell_stats(results, [cell_name(c) for c in spec.cells()])
    assert [c.name for c in stats] == ["base", "weighting-decreasing", "branches-1"]
    base, decreasing, plain = stats
    assert base.seeds == [0, 1] and base.final.n == 2 and base.final_vs_base is None
    finals = {(r.name, r.seed): r.final_accuracy for r in results}
    paired = [finals["weighting-decreasing", s] - finals["base", s] for s in (0, 1)]
    assert decreasing.final_vs_base is not None and decreasing.final_vs_base.mean == pytest.approx(np.mean(paired))
    assert plain.r2_vs_unbranched is None and base.r2_vs_unbranched is not None and len(base.r2_vs_unbranched) == 4

    report = write_study(results, spec, tmp_path).read_text()
    table = study_table(stats, spec.cost_budget).splitlines()
    assert table[0].startswith("| cell | seeds |") and table[2].startswith("| base | 0,1 |")
    assert "\n".join(table) in report and (tmp_path / "study.png").is_file()
    assert f"`{spec.command(tmp_path)}`" in report and "--seeds 0,1" in spec.command(tmp_path)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(study_module, "train", no_training)
    again = run_study(spec, data, tmp_path, base_arch=TINY, progress=False, after_cell=no_training)
    assert [r.model_dump() for r in again] == [r.model_dump() for r in results]
    # more seeds and cells may be added to a study; --report-only reports the finished runs and trains nothing
    grown = spec.model_copy(update={"seeds": [0, 1, 2], "extra": [{"weighting": "increasing"}]})
    partial = run_study(grown, data, tmp_path, base_arch=TINY, progress=False, train_missing=False)
    assert sorted((r.name, r.seed) for r in partial) == sorted((r.name, r.seed) for r in results)
    with pytest.raises(ValueError, match="other settings"):
        run_study(spec.model_copy(update={"epochs": 2}), data, tmp_path, base_arch=TINY, progress=False)


def test_intervals() -> None:
    one = Interval.of([0.5])
    assert one.mean == 0.5 and np.isnan(one.half) and not one.excludes_zero()
    three = Interval.of([1.0, 2.0, 3.0])  # s = 1, t(0.975, 2) = 4.303: ±2.48 spans zero
    assert three.mean == pytest.approx(2.0) and three.half == pytest.approx(4.303 / np.sqrt(3))
    assert not three.excludes_zero() and Interval.of([2.0, 2.1, 1.9]).excludes_zero()
