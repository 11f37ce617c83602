"""The model-repository manifest: the one contract between `training/` (which writes it) and `server/`.

A model version lives in `<repo>/<name>/<version>/` with `manifest.json` beside its ONNX files.
`load_manifest` refuses a version whose files do not match what the manifest says, so the server
never starts on a half-copied or hand-edited repository.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION: Final = 2
"""2: per-channel mean and std, and a resize policy (version 1 had one mean and std and only stretched)."""
MANIFEST_FILE = "manifest.json"
CHANNELS = {"L": 1, "RGB": 3}

ConfidenceKind = Literal["max_softmax", "entropy", "margin"]
RiskKind = Literal["disagreement", "accuracy_drop"]
"""disagreement: the share of answers that differ from the final exit's (needs no labels, so live
traffic can be checked against it); accuracy_drop: the final exit's accuracy minus the point's."""


class RepositoryError(ValueError):
    """A model repository or version that cannot be served; the message says what to fix."""


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ColorMode = Literal["L", "RGB"]
ResizePolicy = Literal["stretch", "center-crop"]


class InputSpec(Schema):
    """What one input is and how a client's image becomes one (`imaging.image_to_input`, which
    training's datasets call too)."""

    name: str = "input"
    shape: tuple[int, int, int] = Field(description="(channels, height, width) of one input, no batch axis")
    dtype: Literal["float32"] = "float32"
    color_mode: ColorMode = Field(description="PIL mode an image is converted to before resizing")
    resize: ResizePolicy = Field(
        "stretch",
        description="stretch: resize to (height, width), whatever the aspect ratio; center-crop: resize so the "
        "image covers (height, width), keeping its aspect ratio, and cut out the centre",
    )
    interpolation: Literal["bilinear"] = "bilinear"
    scale: float = Field(1 / 255, description="pixel value multiplier applied before normalisation")
    mean: tuple[float, ...] = Field(description="per channel, subtracted after scaling")
    std: tuple[float, ...] = Field(description="per channel, divides after the mean is subtracted")

    @model_validator(mode="after")
    def _per_channel(self) -> InputSpec:
        channels = self.shape[0]
        if CHANNELS[self.color_mode] != channels:
            raise ValueError(f"color mode {self.color_mode} has {CHANNELS[self.color_mode]} channels, shape {channels}")
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"need one mean and one std per channel ({channels}), got {self.mean} and {self.std}")
        if min(self.std) <= 0 or min(self.shape) < 1:
            raise ValueError(f"std must be positive and the shape at least 1×1, got {self.std} and {self.shape}")
        return self


class StageSpec(Schema):
    """One stage graph: takes the previous boundary tensor, yields its own boundary and its exit's logits."""

    index: int
    file: str
    sha256: str
    input_name: str
    boundary_output: str | None = Field(description="None for the last stage, which only yields logits")
    logits_output: str
    backbone_macs: int
    head_macs: int


class CalibrationBin(Schema):
    lower: float
    upper: float
    count: int
    accuracy: float | None


class ExitSpec(Schema):
    index: int
    after_block: int = Field(description="the backbone stage (block, for the built-in ResNet) the exit follows")
    after_module: str | None = Field(None, description="the named module the exit follows, for a cut backbone")
    val_accuracy: float
    test_accuracy: float
    mean_confidence: float
    reliability: list[CalibrationBin] = Field(description="validation accuracy by confidence bin")


class OperatingPoint(Schema):
    """Per-exit thresholds and what they are expected to give; the last exit always answers."""

    name: str
    search: Literal["shared", "per-exit", "full"]
    thresholds: list[float] = Field(
        description="one per exit; a sample leaves at exit k when confidence ≥ thresholds[k]; "
        "a threshold above 1 means exit k never answers"
    )
    val_accuracy: float = Field(description="on the whole validation split")
    holdout_accuracy: float | None = Field(
        None, description="on the validation half that chose the frontier, never seen by the threshold search"
    )
    test_accuracy: float = Field(description="reported only, never used for a choice")
    exit_fractions: list[float] = Field(description="share of validation samples leaving at each exit")
    test_exit_fractions: list[float] | None = None
    expected_macs: float
    expected_latency_ms: float = Field(description="at batch 1, from the cost profile's stage latencies")
    relative_cost: float = Field(description="expected latency over the full graph's, at batch 1")


class StageLatency(Schema):
    batch_size: int
    stage_ms: list[float] = Field(
        description="what each stage adds to the median latency of the chain up to its exit; sums to chain_ms"
    )
    chain_ms: float = Field(description="median latency of all stages chained")
    full_graph_ms: float = Field(description="median latency of the single full graph")
    runs: int | None = Field(None, description="timed runs after warm-up that each median is taken over")


class CostProfile(Schema):
    host: str
    cpu_count: int
    onnxruntime: str
    intra_op_threads: int
    measured_at: str
    load_average: tuple[float, float, float] | None = Field(
        None, description="os.getloadavg() when measuring: a busy host makes every figure suspect"
    )
    latency: list[StageLatency]

    def at_batch(self, batch_size: int) -> StageLatency:
        for row in self.latency:
            if row.batch_size == batch_size:
                return row
        raise KeyError(batch_size)


class FullGraphSpec(Schema):
    file: str
    sha256: str
    input_name: str
    logits_outputs: list[str]
    boundary_outputs: list[str] = Field(default_factory=list, description="stage boundary tensors, for checks")


class Candidate(Schema):
    """One hypothesis of the fixed sequence: thresholds proposed on validation half A, counted on half B."""

    thresholds: list[float]
    point: str = Field(description="the operating point with these thresholds: on the frontier, or certification's")
    proposal_disagreement: float = Field(description="on half A; orders the sequence for the disagreement risk")
    proposal_accuracy_drop: float = Field(description="on half A; orders the sequence for the accuracy-drop risk")
    disagreements: int = Field(ge=0, description="on half B: answers that differ from the final exit's")
    lost: int = Field(ge=0, description="on half B: wrong answers where the final exit is right")
    gained: int = Field(ge=0, description="on half B: right answers where the final exit is wrong")


class Guarantee(Schema):
    """What a certified point lets a response claim: with probability ≥ 1 − delta over calibration, risk ≤ epsilon."""

    risk: RiskKind
    epsilon: float = Field(description="the risk is at most this")
    delta: float = Field(description="with probability at least 1 − delta over the calibration sample")
    method: str
    n: int = Field(description="calibration images the certificate rests on (0: exact, full depth)")
    bound: float = Field(description="the point's own (1 − delta) upper confidence bound on the risk, ≤ epsilon")


class Certificate(Guarantee):
    """A target certified when the version was calibrated, and the cheapest point meeting it."""

    point: str


class Certification(Schema):
    """Counts from which any (risk, ε, δ) can be certified: see branchserve/repo/certify.py."""

    method: str
    sample: str = Field(description="which images the counts come from, none of which proposed a threshold")
    n: int = Field(gt=0, description="images counted per candidate")
    candidates: list[Candidate] = Field(description="every proposal, most expensive first; `final` leads")
    points: list[OperatingPoint] = Field(
        default_factory=list,
        description="candidates that are not on the frontier (it keeps the best accuracy for the cost; these may "
        "disagree less with the final exit for the cost), for certified policies to choose",
    )
    certificates: list[Certificate] = Field(default_factory=list)


class Manifest(Schema):
    schema_version: Literal[2] = SCHEMA_VERSION
    name: str
    version: int
    created_at: str
    input: InputSpec
    labels: list[str]
    confidence: ConfidenceKind = "max_softmax"
    stages: list[StageSpec]
    exits: list[ExitSpec]
    full_graph: FullGraphSpec
    frontier: list[OperatingPoint]
    default_operating_point: str
    cost: CostProfile
    certification: Certification | None = Field(
        None, description="risk counts for certified operating points; `branchserve calibrate --certify` adds it"
    )
    provenance: dict[str, object] = Field(description="regime, data split, seed, training summary, commit")

    def operating_point(self, name: str) -> OperatingPoint:
        """A frontier point, or one of certification's own points, by name."""
        for point in self.frontier + ([] if self.certification is None else self.certification.points):
            if point.name == name:
                return point
        raise KeyError(name)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def input_from_v1(spec: dict[str, Any]) -> dict[str, Any]:
    """A version-1 input spec (one scalar mean and std, `resize: bilinear`) in version 2's form; the
    conversion it describes is unchanged. Old checkpoints hold the same form."""
    if isinstance(spec.get("mean"), int | float) and isinstance(spec.get("std"), int | float):
        spec = {**spec, "mean": [spec["mean"]], "std": [spec["std"]]}
    if spec.get("resize") == "bilinear":
        spec = {**spec, "resize": "stretch", "interpolation": "bilinear"}
    return spec


def migrated(doc: Any) -> Any:
    """A manifest document in the current schema: version 1 differs only in its input spec."""
    if isinstance(doc, dict) and doc.get("schema_version") == 1 and isinstance(doc.get("input"), dict):
        return {**doc, "schema_version": SCHEMA_VERSION, "input": input_from_v1(doc["input"])}
    return doc


def load_manifest(version_dir: Path) -> Manifest:
    """Parse and check a version folder: schema (version 1 is migrated), file presence and hashes,
    internal consistency."""
    path = version_dir / MANIFEST_FILE
    if not path.is_file():
        raise RepositoryError(f"{version_dir}: no {MANIFEST_FILE}")
    try:
        manifest = Manifest.model_validate(migrated(json.loads(path.read_bytes())))
    except json.JSONDecodeError as e:
        raise RepositoryError(f"{path}: invalid manifest: not JSON ({e})") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RepositoryError(f"{path}: invalid manifest at '{where}': {first['msg']}") from None
    files = [(s.file, s.sha256) for s in manifest.stages] + [(manifest.full_graph.file, manifest.full_graph.sha256)]
    for name, expected in files:
        f = version_dir / name
        if Path(name).name != name:
            raise RepositoryError(f"{path}: file {name!r} must be a plain name inside the version folder")
        if not f.is_file():
            raise RepositoryError(f"{version_dir}: manifest names {name}, which is missing")
        if sha256_of(f) != expected:
            raise RepositoryError(f"{version_dir}: {name} does not match its sha256 in the manifest")
    n = len(manifest.stages)
    if len(manifest.exits) != n or n == 0:
        raise RepositoryError(f"{path}: {n} stages but {len(manifest.exits)} exits")
    if any(s.boundary_output is None for s in manifest.stages[:-1]) or manifest.stages[-1].boundary_output:
        raise RepositoryError(f"{path}: every stage but the last needs a boundary output, and the last none")
    feeds = [manifest.input.name] + [s.boundary_output for s in manifest.stages[:-1]]
    for k, (stage, feed) in enumerate(zip(manifest.stages, feeds, strict=True)):
        if stage.index != k or stage.input_name != feed:
            raise RepositoryError(
                f"{path}: stage number {k} (index {stage.index}) must take {feed!r}, "
                f"the tensor before it, not {stage.input_name!r}"
            )
    if manifest.full_graph.input_name != manifest.input.name or len(manifest.full_graph.logits_outputs) != n:
        raise RepositoryError(f"{path}: the full graph must take {manifest.input.name!r} and yield {n} logits")
    for point in manifest.frontier:
        if len(point.thresholds) != n or len(point.exit_fractions) != n:
            raise RepositoryError(f"{path}: operating point {point.name!r} does not have one threshold per exit")
    if manifest.default_operating_point not in {p.name for p in manifest.frontier}:
        raise RepositoryError(
            f"{path}: default operating point {manifest.default_operating_point!r} is not on the frontier"
        )
    if manifest.certification is not None:
        _check_certification(manifest, path)
    if str(manifest.version) != version_dir.name or manifest.name != version_dir.parent.name:
        raise RepositoryError(f"{path}: says {manifest.name}/{manifest.version} but lives in {version_dir}")
    return manifest


def _check_certification(manifest: Manifest, path: Path) -> None:
    cert, exits = manifest.certification, len(manifest.exits)
    assert cert is not None
    frontier, own = [p.name for p in manifest.frontier], [p.name for p in cert.points]
    if len(set(frontier + own)) != len(frontier) + len(own):
        raise RepositoryError(f"{path}: certification's points repeat a name (or a frontier point's)")
    if any(len(p.thresholds) != exits or len(p.exit_fractions) != exits for p in cert.points):
        raise RepositoryError(f"{path}: a certification point does not have one threshold per exit")
    names = set(frontier + own)
    for c in cert.candidates:
        if len(c.thresholds) != exits or max(c.disagreements, c.lost + c.gained) > cert.n:
            raise RepositoryError(f"{path}: a certification candidate does not fit {exits} exits and n = {cert.n}")
        if c.point not in names:
            raise RepositoryError(f"{path}: certification names point {c.point!r}, which it does not define")
    for certificate in cert.certificates:
        if certificate.point not in names:
            raise RepositoryError(f"{path}: certificate names point {certificate.point!r}, which it does not define")
