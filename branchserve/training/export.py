"""Export a trained run as a model-repository version: staged ONNX, calibration, frontier, manifest.

The model is exported once, as one graph whose outputs are every exit's logits and every stage
boundary tensor; the stage graphs are cut out of that graph (`onnx.utils.Extractor`), so they hold
the very same nodes and weights and only the cut decides what runs. ORT computes a whole graph
whatever outputs are asked for, so the cut is what lets an early exit skip the later stages.

Nothing is written to the repository until the graphs pass the ONNX checker and match torch
(ORT full graph and ORT chain, max |Δ| ≤ 1e-4 and identical argmax on every exit): a version
folder appears complete or not at all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
import torch
from torch import Tensor, nn
from tqdm import tqdm

from branchserve.repo.frontier import (
    ExitScores,
    SearchSettings,
    cheapest_within,
    expected_cost,
    full_thresholds,
    score,
    search,
)
from branchserve.repo.loading import load_version
from branchserve.repo.manifest import (
    MANIFEST_FILE,
    CalibrationBin,
    ConfidenceKind,
    CostProfile,
    ExitSpec,
    FullGraphSpec,
    InputSpec,
    Manifest,
    OperatingPoint,
    StageSpec,
    sha256_of,
)
from branchserve.repo.profiling import cost_profile, run_chain
from branchserve.repo.sessions import load_session
from branchserve.training.data import Dataset, Split
from branchserve.training.model import BranchedNet, stage_macs
from branchserve.training.train import CHECKPOINT, SUMMARY, git_commit, load_model

OPSET = 18
TOLERANCE = 1e-4
FULL_FILE = "full.onnx"
FINAL, NEAR_FINAL = "final", "near-final"


class ExportError(RuntimeError):
    """An export that would produce a wrong or unloadable model version; nothing was written."""


def logits_name(k: int) -> str:
    return f"logits_{k}"


def boundary_name(k: int) -> str:
    return f"boundary_{k}"


def stage_file(k: int) -> str:
    return f"stage_{k}.onnx"


class AllOutputs(nn.Module):
    """The model with every exit's logits and every stage boundary as outputs, for the full graph."""

    def __init__(self, model: BranchedNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        logits, boundaries = [], []
        for k in range(len(self.model.heads)):
            x, y = self.model.run_stage(k, x)
            logits.append(y)
            boundaries.append(x)
        return (*logits, *boundaries[:-1])


def averaging(out: int, size: int) -> Tensor:
    """Row i averages input positions ⌊i·size/out⌋ … ⌈(i+1)·size/out⌉ − 1, as torch's adaptive pooling does."""
    m = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, -(-(i + 1) * size // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class PooledLinear(nn.Module):
    """Adaptive average pooling, flatten and the linear layer after it, as one linear layer on the
    flattened feature map: pooling is linear, so W' = W · (Pₕ ⊗ Pᵥ) gives the same logits.

    Where the pooling grid does not divide the feature map (14→4 and 7→4 in the exit heads) the
    exporter lowers adaptive pooling into chains of Gather/Where/Split (~500 µs of kernel time per
    batch-1 run in the 7→4 head); as two constant MatMuls it still cost ~35 µs, and an identity
    pool (4→4) still ran as an AveragePool node. One Gemm does all of it.
    """

    def __init__(self, pool: nn.AdaptiveAvgPool2d, linear: nn.Linear, channels: int, height: int, width: int) -> None:
        super().__init__()
        size = pool.output_size
        out_h, out_w = (size, size) if isinstance(size, int) else size
        w = linear.weight.detach().reshape(-1, channels, out_h or height, out_w or width)
        folded = torch.einsum(
            "ocij,ih,jw->ochw", w, averaging(out_h or height, height), averaging(out_w or width, width)
        )
        self.register_buffer("weight", folded.reshape(len(folded), -1).contiguous())
        self.register_buffer("bias", linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x.flatten(1), self.weight, self.bias)


def for_export(model: BranchedNet, spec: InputSpec) -> BranchedNet:
    """A copy whose exit heads end in `PooledLinear` instead of pool, flatten and linear; the
    original stays the reference the exported graphs are checked against."""
    copy = deepcopy(model).eval()
    x = torch.zeros(1, *spec.shape)
    with torch.no_grad():
        for k, head in enumerate(copy.heads):
            x, _ = copy.run_stage(k, x)
            layers = list(head.net)
            pool, flatten, linear = ([None] * 3 + layers)[-3:]
            if not (
                isinstance(pool, nn.AdaptiveAvgPool2d)
                and isinstance(flatten, nn.Flatten)
                and isinstance(linear, nn.Linear)
            ):
                raise ExportError(f"exit head {k}: expected pooling, flatten and linear at its end")
            features = nn.Sequential(*layers[:-3])(x)
            head.net = nn.Sequential(*layers[:-3], PooledLinear(pool, linear, *features.shape[1:]))
    return copy


def export_full_graph(model: BranchedNet, spec: InputSpec) -> onnx.ModelProto:
    """One graph, dynamic batch axis, through torch's dynamo exporter."""
    n = len(model.heads)
    outputs = [logits_name(k) for k in range(n)] + [boundary_name(k) for k in range(n - 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecation notices
        program = torch.onnx.export(
            AllOutputs(for_export(model, spec)).eval(),
            (torch.zeros(2, *spec.shape),),
            input_names=[spec.name],
            output_names=outputs,
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            optimize=True,  # constant folding; BatchNorm folds into the convolutions
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    return program.model_proto


def split_stages(full: onnx.ModelProto, n: int, input_name: str) -> list[onnx.ModelProto]:
    """Stage k: previous boundary (or the input) → its own boundary (not for the last) and exit k's logits."""
    extractor = onnx.utils.Extractor(full)
    stages = []
    for k in range(n):
        inputs = [input_name if k == 0 else boundary_name(k - 1)]
        outputs = ([boundary_name(k)] if k < n - 1 else []) + [logits_name(k)]
        stages.append(route_input_through_pool(extractor.extract_model(inputs, outputs)))
    return stages


def route_input_through_pool(stage: onnx.ModelProto) -> onnx.ModelProto:
    """Feed the graph input's non-Conv consumers through a 1×1 MaxPool (an identity).

    onnxruntime computes convolutions in a blocked layout (NCHWc) and re-blocks a graph input only
    for the Conv nodes reading it; the residual Add of an identity-shortcut block whose input is the
    stage's input then stays in plain layout, unfused, with the conv output converted back and forth
    (~11 µs of the 4×4 stage's ~230 µs at batch 1). A pool is re-blocked like a Conv, so the Add
    fuses into the convolution again, as in the full graph.
    """
    graph = stage.graph
    source = graph.input[0].name
    consumers = [node for node in graph.node if source in node.input and node.op_type != "Conv"]
    if not consumers:
        return stage
    pooled = f"{source}_blocked"
    for node in consumers:
        node.input[:] = [pooled if name == source else name for name in node.input]
    graph.node.insert(0, onnx.helper.make_node("MaxPool", [source], [pooled], name=pooled, kernel_shape=[1, 1]))
    return stage


def check_graph(proto: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{what} fails the ONNX checker: {e}") from None
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch.dim_param:
        raise ExportError(f"{what}: batch axis is fixed at {batch.dim_value}, expected it dynamic")


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


def exit_logits(
    full: ort.InferenceSession, n: int, split: Split, desc: str, progress: bool, batch: int = 500
) -> list[np.ndarray]:
    """Every exit's logits on a whole split, from the exported graph (what the server will run)."""
    out: list[list[np.ndarray]] = [[] for _ in range(n)]
    name = full.get_inputs()[0].name
    for i in tqdm(range(0, len(split), batch), desc=desc, unit="batch", leave=False, disable=not progress):
        for k, z in enumerate(full.run([logits_name(j) for j in range(n)], {name: split.x[i : i + batch].numpy()})):
            out[k].append(z)
    return [np.concatenate(z) for z in out]


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> list[CalibrationBin]:
    """Accuracy per equal-width confidence bin on [0, 1] (the last bin includes 1)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    return [
        CalibrationBin(
            lower=float(edges[b]),
            upper=float(edges[b + 1]),
            count=int((which == b).sum()),
            accuracy=float(correct[which == b].mean()) if (which == b).any() else None,
        )
        for b in range(bins)
    ]


@dataclass(frozen=True)
class ExportSettings:
    """Everything an export chooses besides the run and the data; recorded in provenance."""

    confidence: ConfidenceKind = "max_softmax"
    search: SearchSettings = field(default_factory=SearchSettings)
    default_tolerance: float = 0.003
    batch_sizes: tuple[int, ...] = (1, 8, 64)
    latency_runs: int = 2000
    numerics_batch: int = 256
    split_seed: int = 0


def frontier_points(
    val: ExitScores, test: ExitScores, macs: list[float], cost: CostProfile, settings: ExportSettings
) -> tuple[list[OperatingPoint], str]:
    """The searched frontier plus the full-depth point, scored on val, held-out half and test; and the default."""
    found, half_b = search(val, macs, settings.search)
    n = val.confidence.shape[0]
    found.append(("full", full_thresholds(n)))
    rows = np.stack([t for _, t in found])
    val_acc, val_frac = score(val, rows)
    hold_acc, _ = score(val.take(half_b), rows)
    test_acc, test_frac = score(test, rows)
    batch1 = cost.at_batch(1)
    points = []
    order = np.argsort([expected_cost(f, macs) for f in val_frac], kind="stable")
    for rank, i in enumerate(order):
        kind = found[i][0]
        latency = expected_cost(val_frac[i], batch1.stage_ms)
        points.append(
            OperatingPoint(
                name=FINAL if kind == "full" else f"{kind}-{rank:02d}",
                search=kind,
                thresholds=[float(t) for t in rows[i]],
                val_accuracy=float(val_acc[i]),
                holdout_accuracy=float(hold_acc[i]),
                test_accuracy=float(test_acc[i]),
                exit_fractions=[float(f) for f in val_frac[i]],
                test_exit_fractions=[float(f) for f in test_frac[i]],
                expected_macs=expected_cost(val_frac[i], macs),
                expected_latency_ms=latency,
                relative_cost=latency / batch1.full_graph_ms,
            )
        )
    final_acc = float(val.correct[-1].mean())
    default = cheapest_within(points, final_acc, settings.default_tolerance)
    if default.name != FINAL:
        points = [p.model_copy(update={"name": NEAR_FINAL}) if p is default else p for p in points]
        return points, NEAR_FINAL
    return points, FINAL


def next_version(model_dir: Path) -> int:
    existing = (
        [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    )
    return max(existing, default=0) + 1


def uncommitted_changes() -> bool | None:
    """Whether tracked files differ from the commit recorded beside them (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        )
    except OSError:
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def provenance(
    run_dir: Path,
    checkpoint_sha256: str,
    summary: dict[str, Any],
    data: Dataset,
    settings: ExportSettings,
    worst: float,
) -> dict[str, Any]:
    return {
        "run": str(run_dir),
        "checkpoint_sha256": checkpoint_sha256,
        "regime": summary["config"],
        "seed": summary["config"]["seed"],
        "arch": summary["arch"],
        "data": {
            **data.describe(),
            "split_seed": settings.split_seed,
            "calibrated_on": "val",
            "test_use": "reported only",
        },
        "training": {
            k: summary.get(k)
            for k in ("val_accuracy", "test_accuracy", "epochs", "wall_time_s", "parameters", "commit", "phases")
        },
        "export": {
            "commit": git_commit(),
            "uncommitted_changes": uncommitted_changes(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "opset": OPSET,
            "max_abs_diff_vs_torch": worst,
            "confidence": settings.confidence,
            "search": asdict(settings.search),
            "default_rule": f"cheapest point (expected MACs) with val accuracy ≥ final exit's − {settings.default_tolerance}",
        },
    }


def export_run(
    run_dir: Path,
    repo: Path,
    name: str,
    data: Dataset,
    version: int | None = None,
    settings: ExportSettings = ExportSettings(),
    progress: bool = True,
) -> Path:
    """Export `run_dir` to `repo/name/version/` (default: the next free version) and return that folder.

    `data` must be the dataset the run was trained on: its validation split calibrates the exits
    and the frontier; its test split is scored and reported, never used for a choice.
    """
    if not (run_dir / SUMMARY).is_file():
        raise ExportError(f"{run_dir}/{SUMMARY} not found: the run has not finished training")
    summary = json.loads((run_dir / SUMMARY).read_text())
    model, ckpt = load_model(run_dir)
    checkpoint_sha256 = sha256_of(run_dir / CHECKPOINT)  # now: a retraining run may replace the file later
    spec = InputSpec.model_validate(ckpt["input"])
    if ckpt["labels"] != data.labels or spec != data.input or summary["data"] != data.describe():
        raise ExportError(
            f"{run_dir} was trained on {summary['data']} with labels {ckpt['labels']}, "
            f"not on the data given ({data.describe()}, labels {data.labels})"
        )
    model_dir = repo / name
    version = version or next_version(model_dir)
    final_dir = model_dir / str(version)
    if final_dir.exists():
        raise ExportError(f"{final_dir} already exists; pick another --version")
    work = model_dir / f".export-{version}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        manifest = _build(
            model, run_dir, checkpoint_sha256, summary, spec, name, version, data, work, settings, progress
        )
        (work / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        work.rename(final_dir)
        load_version(final_dir)  # what the server will do: refuse here, not there
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(final_dir, ignore_errors=True)
        if not any(model_dir.iterdir()):
            model_dir.rmdir()
        raise
    return final_dir


def _build(
    model: BranchedNet,
    run_dir: Path,
    checkpoint_sha256: str,
    summary: dict[str, Any],
    spec: InputSpec,
    name: str,
    version: int,
    data: Dataset,
    work: Path,
    settings: ExportSettings,
    progress: bool,
) -> Manifest:
    n = len(model.heads)
    full = export_full_graph(model, spec)
    check_graph(full, FULL_FILE)
    onnx.save(full, work / FULL_FILE)
    for k, stage in enumerate(split_stages(full, n, spec.name)):
        check_graph(stage, stage_file(k))
        onnx.save(stage, work / stage_file(k))
    worst = verify_numerics(model, work, n, data.val.x[: settings.numerics_batch])

    session = load_session(work / FULL_FILE)
    val = ExitScores.from_logits(
        exit_logits(session, n, data.val, "val", progress), data.val.y.numpy(), settings.confidence
    )
    test = ExitScores.from_logits(
        exit_logits(session, n, data.test, "test", progress), data.test.y.numpy(), settings.confidence
    )
    measured, trained = val.correct.mean(axis=1), np.asarray(summary["val_accuracy"])
    if np.abs(measured - trained).max() > 2 / len(data.val):  # a near-tie may flip between torch and ORT
        raise ExportError(
            f"exits score {np.round(measured, 4).tolist()} on this validation split but "
            f"{np.round(trained, 4).tolist()} in training: is it the split the run used (--split-seed)?"
        )
    stage_files = [work / stage_file(k) for k in range(n)]
    cost = cost_profile(
        stage_files, work / FULL_FILE, spec.shape, settings.batch_sizes, settings.latency_runs, progress
    )
    per_stage = stage_macs(model)
    macs = [float(r["backbone_macs"] + r["head_macs"]) for r in per_stage]
    frontier, default = frontier_points(val, test, macs, cost, settings)
    return Manifest(
        name=name,
        version=version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        input=spec,
        labels=data.labels,
        confidence=settings.confidence,
        stages=[
            StageSpec(
                index=k,
                file=stage_file(k),
                sha256=sha256_of(work / stage_file(k)),
                input_name=spec.name if k == 0 else boundary_name(k - 1),
                boundary_output=boundary_name(k) if k < n - 1 else None,
                logits_output=logits_name(k),
                backbone_macs=per_stage[k]["backbone_macs"],
                head_macs=per_stage[k]["head_macs"],
            )
            for k in range(n)
        ],
        exits=[
            ExitSpec(
                index=k,
                after_block=model.arch.exits[k],
                val_accuracy=float(val.correct[k].mean()),
                test_accuracy=float(test.correct[k].mean()),
                mean_confidence=float(val.confidence[k].mean()),
                reliability=reliability(val.confidence[k], val.correct[k]),
            )
            for k in range(n)
        ],
        full_graph=FullGraphSpec(
            file=FULL_FILE,
            sha256=sha256_of(work / FULL_FILE),
            input_name=spec.name,
            logits_outputs=[logits_name(k) for k in range(n)],
            boundary_outputs=[boundary_name(k) for k in range(n - 1)],
        ),
        frontier=frontier,
        default_operating_point=default,
        cost=cost,
        provenance=provenance(run_dir, checkpoint_sha256, summary, data, settings, worst),
    )
