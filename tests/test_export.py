"""Export on a tiny trained model: graphs, numerics, calibration, frontier, `calibrate` and `inspect`."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from branchserve.cli import main
from branchserve.repo.confidence import confidence, softmax
from branchserve.repo.frontier import (
    NEVER,
    ExitScores,
    SearchSettings,
    candidates,
    exits_taken,
    expected_cost,
    pareto,
    score,
    search,
)
from branchserve.repo.graphcalls import BoundChain, run_chain
from branchserve.repo.loading import load_version
from branchserve.repo.manifest import MANIFEST_FILE, Manifest
from branchserve.repo.profiling import BoundGraphs
from branchserve.repo.sessions import load_session
from branchserve.training import provenance
from branchserve.training.data import Dataset
from branchserve.training.export import ExportError
from branchserve.training.export.calibration import check_split
from branchserve.training.export.graphs import PooledLinear, for_export, route_input_through_pool
from branchserve.training.export.numerics import verify_numerics
from branchserve.training.export.publish import export_run, next_version
from branchserve.training.model import stage_macs
from branchserve.training.provenance import checkout
from branchserve.training.train import SUMMARY, evaluate, load_model


@pytest.fixture(scope="module")
def version_dir(tiny_version: Path) -> Path:
    return tiny_version


@pytest.fixture(scope="module")
def manifest(tiny_version: Path) -> Manifest:
    return load_version(tiny_version)


def full_graph_logits(version_dir: Path, m: Manifest, x: np.ndarray) -> list[np.ndarray]:
    session = load_session(version_dir / m.full_graph.file)
    return session.run(m.full_graph.logits_outputs, {m.input.name: x})


def test_bound_runs_write_what_the_chain_and_full_graph_compute(version_dir: Path, manifest: Manifest) -> None:
    """The timed runs go through onnxruntime's C binding: they must do the work, into the bound buffers."""
    stages = [load_session(version_dir / s.file) for s in manifest.stages]
    full = load_session(version_dir / manifest.full_graph.file)
    x = np.random.default_rng(1).standard_normal((3, *manifest.input.shape)).astype(np.float32)
    graphs = BoundGraphs(stages, full, x)
    graphs.time_chain()
    graphs.time_full()
    expected = run_chain(stages, x)
    for k, (spec, outputs) in enumerate(zip(manifest.stages, graphs.chain.outputs, strict=True)):
        np.testing.assert_allclose(outputs[spec.logits_output], expected[k], atol=1e-5)
    for k, name in enumerate(manifest.full_graph.logits_outputs):
        np.testing.assert_allclose(graphs.full.outputs[0][name], expected[k], atol=1e-4)


def test_a_bound_call_keeps_its_buffers_alive(version_dir: Path, manifest: Manifest) -> None:
    """onnxruntime writes into numpy memory it does not own: a call kept after its chain is gone
    must still hold the buffers (else it writes into freed memory)."""
    session = load_session(version_dir / manifest.full_graph.file)
    x = np.random.default_rng(2).standard_normal((1, *manifest.input.shape)).astype(np.float32)
    chain = BoundChain([session], x, [])
    buffer = weakref.ref(chain.outputs[0][manifest.full_graph.logits_outputs[-1]])
    call = chain.calls[0]
    del chain
    gc.collect()
    assert buffer() is not None
    call()
    np.testing.assert_allclose(buffer(), full_graph_logits(version_dir, manifest, x)[-1], atol=1e-6)


def test_graphs_pass_the_checker_with_a_dynamic_batch_axis(version_dir: Path, manifest: Manifest) -> None:
    files = [s.file for s in manifest.stages] + [manifest.full_graph.file]
    assert sorted(p.name for p in version_dir.iterdir()) == sorted([*files, MANIFEST_FILE])
    for name in files:
        proto = onnx.load(version_dir / name)
        onnx.checker.check_model(proto, full_check=True)
        assert proto.opset_import[0].version >= 17
        for tensor in [*proto.graph.input, *proto.graph.output]:
            assert tensor.type.tensor_type.shape.dim[0].dim_param, f"{name}: {tensor.name} has a fixed batch"
    assert [s.input_name for s in manifest.stages] == ["input", "boundary_0", "boundary_1", "boundary_2"]
    assert manifest.stages[-1].boundary_output is None


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_chained_stages_match_the_full_graph_and_torch(
    tiny_run: Path, tiny_data: Dataset, version_dir: Path, manifest: Manifest, batch: int
) -> None:
    model, _ = load_model(tiny_run)
    x = tiny_data.val.x[100 : 100 + batch]
    with torch.no_grad():
        expected = [z.numpy() for z in model(x)]
    full = full_graph_logits(version_dir, manifest, x.numpy())
    chain = run_chain([load_session(version_dir / s.file) for s in manifest.stages], x.numpy())
    assert len(chain) == len(full) == len(expected) == 4
    for k in range(4):
        assert chain[k].shape == (batch, 10)
        assert np.abs(chain[k] - full[k]).max() <= 1e-5
        assert np.abs(chain[k] - expected[k]).max() <= 1e-4
        assert np.array_equal(chain[k].argmax(1), expected[k].argmax(1))


def test_numerics_check_fails_loudly_on_a_mismatch(tiny_run: Path, tiny_data: Dataset, version_dir: Path) -> None:
    model, _ = load_model(tiny_run)
    x = tiny_data.val.x[:32]
    assert verify_numerics(model, version_dir, 4, x) <= 1e-4
    with torch.no_grad():
        model.heads[2].net[-1].bias += 1e-3  # torch now differs from the exported graphs at exit 2 only
    with pytest.raises(ExportError, match=r"ORT full graph, exit 2: max \|Δ\| .+ from torch exceeds 0\.0001"):
        verify_numerics(model, version_dir, 4, x)


def test_manifest_describes_the_model(tiny_run: Path, tiny_data: Dataset, manifest: Manifest) -> None:
    model, ckpt = load_model(tiny_run)
    summary = json.loads((tiny_run / SUMMARY).read_text())
    assert manifest.labels == tiny_data.labels and manifest.input == tiny_data.input
    assert [(s.backbone_macs, s.head_macs) for s in manifest.stages] == [
        (r["backbone_macs"], r["head_macs"]) for r in stage_macs(model)
    ]
    assert [e.after_block for e in manifest.exits] == [0, 1, 2, 3]
    for split, measured in (("val", evaluate(model, tiny_data.val)), ("test", evaluate(model, tiny_data.test))):
        exported = [getattr(e, f"{split}_accuracy") for e in manifest.exits]
        assert np.allclose(exported, measured, atol=2 / 2000), split
    for e in manifest.exits:
        assert sum(b.count for b in e.reliability) == 2000
    p = manifest.provenance
    assert p["seed"] == 0 and p["regime"] == ckpt["config"] and p["training"]["data"] == summary["data"]
    assert p["data"] == {**tiny_data.describe(), "source": None, "calibrated_on": "val", "test_use": "reported only"}
    code = checkout()
    for record in (p["training"], p["export"]):
        assert (record["commit"], record["uncommitted_changes"]) == (code.commit, code.uncommitted_changes)
    assert p["export"]["max_abs_diff_vs_torch"] <= 1e-4
    assert [r.batch_size for r in manifest.cost.latency] == [1, 4]
    for row in manifest.cost.latency:
        assert row.full_graph_ms > 0 and row.chain_ms > 0 and all(s > 0 for s in row.stage_ms)
        assert sum(row.stage_ms) == pytest.approx(row.chain_ms)  # full depth is priced as the chain


def assign_exit_by_exit(conf: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """The server's rule, written out plainly: leave at the first exit whose confidence reaches its threshold."""
    last = len(thresholds) - 1
    taken, undecided = np.full(conf.shape[1], last), np.ones(conf.shape[1], dtype=bool)
    for k in range(last):
        leaving = undecided & (conf[k] >= thresholds[k])
        taken[leaving], undecided = k, undecided & ~leaving
    return taken


def test_every_operating_point_reproduces_from_its_thresholds(
    tiny_data: Dataset, version_dir: Path, manifest: Manifest
) -> None:
    """Re-score each stored point from real ORT logits: val and test accuracy, exit shares, costs."""
    macs = [s.backbone_macs + s.head_macs for s in manifest.stages]
    batch1 = manifest.cost.at_batch(1)
    for split in ("val", "test"):
        data = getattr(tiny_data, split)
        probs = [softmax(z) for z in full_graph_logits(version_dir, manifest, data.x.numpy())]
        conf = np.stack([confidence(p, manifest.confidence) for p in probs])
        correct = np.stack([p.argmax(1) == data.y.numpy() for p in probs])
        for point in manifest.frontier:
            taken = assign_exit_by_exit(conf, point.thresholds)
            fractions = np.bincount(taken, minlength=4) / len(taken)
            accuracy = correct[taken, np.arange(len(taken))].mean()
            stored = point.exit_fractions if split == "val" else point.test_exit_fractions
            assert np.allclose(fractions, stored, atol=1e-9), point.name
            assert accuracy == pytest.approx(getattr(point, f"{split}_accuracy"), abs=1e-9), point.name
    for point in manifest.frontier:
        assert point.expected_macs == pytest.approx(expected_cost(point.exit_fractions, macs))
        assert point.expected_latency_ms == pytest.approx(expected_cost(point.exit_fractions, batch1.stage_ms))
        assert point.relative_cost == pytest.approx(point.expected_latency_ms / batch1.full_graph_ms)


def test_frontier_has_the_full_depth_point_and_the_documented_default(manifest: Manifest) -> None:
    final = manifest.operating_point("final")
    assert final.search == "full" and final.thresholds == [NEVER, NEVER, NEVER, 0.0]
    assert final.exit_fractions == [0.0, 0.0, 0.0, 1.0]
    assert final.val_accuracy == manifest.exits[-1].val_accuracy
    assert final.test_accuracy == manifest.exits[-1].test_accuracy
    macs = [p.expected_macs for p in manifest.frontier]
    assert macs == sorted(macs) and manifest.frontier[-1] == final
    assert {p.search for p in manifest.frontier} >= {"shared", "full"}
    eligible = [p for p in manifest.frontier if p.val_accuracy >= final.val_accuracy - 0.003 - 1e-12]
    default = manifest.operating_point(manifest.default_operating_point)
    assert default == min(eligible, key=lambda p: p.expected_macs)
    assert default.name == ("final" if default is final else "near-final")


def synthetic_scores(n: int, seed: int) -> ExitScores:
    """Four exits, later ones more accurate; a sample's confidence says how likely it is right."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.1, 1.0, size=(4, n))
    skill = np.array([0.0, 0.1, 0.2, 0.3])[:, None]
    correct = rng.uniform(size=(4, n)) < np.clip(conf + skill, 0, 1)
    return ExitScores(conf, correct)


def test_exit_rule_pareto_and_candidates() -> None:
    conf = np.array([[0.9, 0.5, 0.5], [0.1, 0.8, 0.5], [0.0, 0.0, 0.0]])
    taken = exits_taken(conf, np.array([[0.9, 0.8, 5.0], [NEVER, NEVER, 0.0], [0.0, 0.0, 0.0]]))
    assert taken.tolist() == [[0, 1, 2], [2, 2, 2], [0, 0, 0]]
    assert pareto(np.array([3.0, 1.0, 2.0, 2.0, 4.0]), np.array([0.9, 0.5, 0.7, 0.8, 0.85])).tolist() == [1, 3, 0]
    rows, kinds = candidates(synthetic_scores(200, 0).confidence, levels=8, offsets=(-1.0, 0.0, 1.0))
    assert kinds.count("shared") == 8 and kinds.count("per-exit") == 8 * (27 - 3)  # uniform moves are shared
    assert (rows[:, -1] == 0).all()


def test_search_proposes_on_one_half_and_keeps_what_wins_on_the_other() -> None:
    scores, macs = synthetic_scores(4000, 1), [1.0, 1.0, 1.0, 1.0]
    settings = SearchSettings(holdout_seed=3, levels=16)
    found, half_b = search(scores, macs, settings)
    order = np.random.default_rng(3).permutation(4000)
    assert sorted(half_b.tolist()) == sorted(order[2000:].tolist())
    proposable, _ = candidates(scores.take(order[:2000]).confidence, 16, settings.offsets)
    rows = np.stack([t for _, t in found])
    assert all(any(np.array_equal(r, c) for c in proposable) for r in rows)  # thresholds only ever from half A
    accuracy, fractions = score(scores.take(half_b), rows)
    cost = fractions @ np.cumsum(macs)
    assert (np.diff(cost) > 0).all() and (np.diff(accuracy) > 0).all()  # each point beats every cheaper one on B


def test_export_refuses_data_the_run_was_not_trained_on(tiny_run: Path, tiny_data: Dataset, tmp_path: Path) -> None:
    other = Dataset(
        tiny_data.name, tiny_data.labels, tiny_data.input, tiny_data.train, tiny_data.val.head(1000), tiny_data.test
    )
    with pytest.raises(ExportError, match="was trained on"):
        export_run(tiny_run, tmp_path, "x", other, progress=False)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_run, unfinished)
    (unfinished / SUMMARY).unlink()
    with pytest.raises(ExportError, match="has not finished training"):
        export_run(unfinished, tmp_path, "x", tiny_data, progress=False)
    assert not (tmp_path / "x").exists()


def test_split_check_compares_the_images_training_scored() -> None:
    """A run trained with --eval-limit N scored the first N validation images; export calibrates on all."""
    correct = np.zeros((2, 100), dtype=bool)
    correct[:, :50] = True
    scores = ExitScores(np.ones((2, 100)), correct)
    check_split(scores, {"data": {"eval_limit": 50}, "val_accuracy": [1.0, 1.0]})
    check_split(scores, {"data": {"eval_limit": None}, "val_accuracy": [0.5, 0.5]})
    with pytest.raises(ExportError, match="is it the split the run used"):
        check_split(scores, {"data": {"eval_limit": 50}, "val_accuracy": [0.5, 0.5]})


def test_checkout_is_what_git_says() -> None:
    """One `git status` call gives both the commit and the dirty flag that runs and versions record."""
    package = Path(provenance.__file__).parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=package)
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=package
    )
    code = checkout()
    if head.returncode != 0:
        assert (code.commit, code.uncommitted_changes) == (None, None)
    else:
        assert (code.commit, code.uncommitted_changes) == (head.stdout.strip(), bool(status.stdout.strip()))


def test_calibrate_reprices_the_frontier_without_torch(tiny_version: Path, tmp_path: Path) -> None:
    version_dir = tmp_path / "repo" / "tiny" / "1"
    shutil.copytree(tiny_version, version_dir)
    before = load_version(version_dir)
    script = (
        "import sys; from pathlib import Path; from branchserve.repo.cli import calibrate; "
        f"calibrate(Path({str(version_dir)!r}), [1, 2], 60, progress=False); "
        "assert 'torch' not in sys.modules, 'calibrate imported torch'"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent.parent)
    after = load_version(version_dir)
    assert [r.batch_size for r in after.cost.latency] == [1, 2]
    assert [p.name for p in after.frontier] == [p.name for p in before.frontier]
    assert after.default_operating_point == before.default_operating_point
    stage_ms, full_ms = after.cost.at_batch(1).stage_ms, after.cost.at_batch(1).full_graph_ms
    for old, new in zip(before.frontier, after.frontier, strict=True):
        assert new.model_dump(exclude={"expected_latency_ms", "relative_cost"}) == old.model_dump(
            exclude={"expected_latency_ms", "relative_cost"}
        )
        assert new.expected_latency_ms == pytest.approx(expected_cost(new.exit_fractions, stage_ms))
        assert new.relative_cost == pytest.approx(new.expected_latency_ms / full_ms)


def test_inspect_prints_tables_and_writes_a_plot(
    version_dir: Path, manifest: Manifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["inspect", str(version_dir), "--plot", str(tmp_path / "frontier.png")])
    out = capsys.readouterr().out
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for point in manifest.frontier:
        assert point.name in out
    assert f"{manifest.default_operating_point} *" in out
    assert "chain / full" in out and f"{100 * manifest.exits[-1].test_accuracy:.2f}" in out


def test_versions_count_up_and_confidence_measures_differ(tmp_path: Path) -> None:
    assert next_version(tmp_path / "absent") == 1
    for name in ("1", "3", ".export-4", "notes"):
        (tmp_path / name).mkdir()
    assert next_version(tmp_path) == 4
    logits = [np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])]
    labels = np.array([0, 1])
    kinds = ("max_softmax", "entropy", "margin")
    conf = {kind: ExitScores.from_logits(logits, labels, kind).confidence[0] for kind in kinds}
    assert conf["max_softmax"][1] == pytest.approx(1 / 3) and conf["margin"][1] == 0 and conf["entropy"][1] < 1e-12
    assert conf["margin"][0] == pytest.approx(softmax(logits[0])[0, 0] - softmax(logits[0])[0, 1])


@pytest.mark.parametrize(("size", "out"), [((14, 14), 4), ((7, 7), 4), ((4, 4), 4), ((6, 9), 2)])
def test_pooled_linear_is_pooling_flatten_and_linear(size: tuple[int, int], out: int) -> None:
    x = torch.randn(3, 5, *size)
    pool, linear = torch.nn.AdaptiveAvgPool2d(out), torch.nn.Linear(5 * out * out, 7)
    expected = linear(pool(x).flatten(1))
    assert torch.allclose(PooledLinear(pool, linear, 5, *size)(x), expected, atol=1e-5)


def test_export_copy_folds_every_head_and_leaves_the_model_alone(tiny_run: Path, tiny_data: Dataset) -> None:
    model, _ = load_model(tiny_run)
    copy = for_export(model, tiny_data.input)
    assert [type(head.net[-1]).__name__ for head in copy.heads] == ["PooledLinear"] * len(copy.heads)
    assert all(isinstance(head.net[-3], torch.nn.AdaptiveAvgPool2d) for head in model.heads)
    with torch.no_grad():
        for a, b in zip(model(tiny_data.val.x[:16]), copy(tiny_data.val.x[:16]), strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_stage_input_reaches_a_residual_add_through_an_identity_pool() -> None:
    """x → Conv → Add(·, x): the Add must read x through the 1×1 MaxPool, the Conv x itself."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["c", "x"], ["y"])],
        "stage",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 4, 4])],
        [w],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.random.default_rng(1).standard_normal((2, 8, 4, 4)).astype(np.float32)
    before = ort_run(proto, x)
    routed = route_input_through_pool(proto)
    onnx.checker.check_model(routed, full_check=True)
    ops = {node.op_type: list(node.input) for node in routed.graph.node}
    assert ops["MaxPool"] == ["x"] and ops["Conv"][0] == "x" and ops["Add"] == ["c", "x_blocked"]
    assert np.array_equal(ort_run(routed, x), before)


def ort_run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
