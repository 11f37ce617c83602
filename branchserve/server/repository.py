"""The served models: every version the version policy selects, loaded, swapped and unloaded whole.

One object owns which model versions are served (KServe's ModelRepository), and every front door
(the native /v1 routes, OIP REST, OIP gRPC) asks it for a `ServedModel`. A load checks and
calibrates new versions in the calling thread (the routes run it in a worker thread, off the event
loop), then publishes the model's new set of versions with one assignment, so a request sees the
old set or the new one, never a mix. A request keeps the `ServedModel` it started with, so it
finishes on that version even if the version is unloaded meanwhile. A load that fails changes
nothing that is served, and the index says why.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from onnxruntime.capi.onnxruntime_pybind11_state import (
    Fail,
    InvalidArgument,
    InvalidGraph,
    InvalidProtobuf,
    NoSuchFile,
    RuntimeException,
)

from branchserve.repo.certify import NotCertified
from branchserve.repo.loading import load_version, model_dirs, version_dirs
from branchserve.repo.manifest import Manifest, RepositoryError
from branchserve.repo.points import Choice, Policy
from branchserve.repo.versions import VersionPolicy
from branchserve.server.admission import Admission
from branchserve.server.errors import RequestError
from branchserve.server.ladder import Ladder, LadderSpec, certified_rungs
from branchserve.server.metrics import Metrics
from branchserve.server.monitor import ExitMonitor, MonitorSettings
from branchserve.server.predictor import ServedModel
from branchserve.server.runtime import ModelRuntime, StageFn

log = logging.getLogger("branchserve")

LOAD_ERRORS = (
    RepositoryError,
    ValueError,
    OSError,
    Fail,
    InvalidArgument,
    InvalidGraph,
    InvalidProtobuf,
    NoSuchFile,
    RuntimeException,
)  # whatever a version's files can make checking, opening or timing its graphs raise


@dataclass(frozen=True)
class VersionState:
    """One version on disk or served, as the repository index shows it."""

    name: str
    version: int
    state: Literal["READY", "UNAVAILABLE"]
    reason: str


RemoteStages = Callable[[Manifest], Sequence[StageFn]]
"""A version's stages where they run elsewhere (the Ray stages layout's deployments)."""


@dataclass(frozen=True)
class Serving:
    """How new versions are served: the server's settings that a version's `ServedModel` takes, and
    this worker's admission, whose queueing the ladder reads and whose idle cores the monitor uses."""

    policy: Policy
    intra_op_threads: int
    metrics: Metrics
    admission: Admission
    ladder: LadderSpec
    monitor: MonitorSettings
    inference_threads: int
    remote_stages: RemoteStages | None = None  # the Ray stages layout; None: sessions here

    def served_model(self, runtime: ModelRuntime, policy: Policy) -> ServedModel:
        """A version served with its own ladder and exit-quality monitor (its thread started); ValueError
        if `policy` does not fit it."""
        admission, cores = self.admission, self.inference_threads
        monitor = ExitMonitor(runtime, self.monitor, self.metrics, idle=lambda: admission.in_flight < cores)
        model = ServedModel(runtime, policy, self.metrics, self._ladder(runtime), monitor)
        monitor.start()
        return model

    def _ladder(self, runtime: ModelRuntime) -> tuple[Ladder, list[Choice]] | None:
        """The ladder's controller and certified rungs; None when the ladder is off or the version has no
        certification counts."""
        if not self.ladder.targets:
            return None
        try:
            rungs = certified_rungs(runtime.manifest, self.ladder)
        except NotCertified as e:
            log.warning("no load-adaptive ladder for %s/%s: %s", runtime.manifest.name, runtime.manifest.version, e)
            return None
        return Ladder(self.ladder.p99_ms / 1e3, self.admission), rungs


class ModelRepository:
    def __init__(self, root: Path, version_policy: VersionPolicy, serving: Serving) -> None:
        self.root, self.version_policy, self.serving = root, version_policy, serving
        self._served: dict[str, dict[int, ServedModel]] = {}  # replaced on every change, never mutated
        self._reasons: dict[tuple[str, int], str] = {}  # why a version on disk is not served
        self._policies: dict[str, Policy] = {}  # operating points set by the admin endpoint
        self._lock = threading.Lock()  # one load or unload at a time
        self.generation = 0  # counts changes to what is served (the OpenAPI schema follows it)

    def load_all(self) -> None:
        """Every model in the repository (at start-up); any failure stops the server with its message."""
        for model_dir in model_dirs(self.root):
            self.load(model_dir.name)
        if not self._served:
            raise RepositoryError(
                f"model repository {self.root} holds no models (expected {self.root}/<name>/<version>/)"
            )

    def names(self) -> list[str]:
        return sorted(self._served)

    def served(self) -> Iterator[ServedModel]:
        """Every version served, by model name and version."""
        for _, versions in sorted(self._served.items()):
            yield from (versions[v] for v in sorted(versions))

    def versions(self, name: str) -> dict[int, ServedModel]:
        try:
            return self._served[name]
        except KeyError:
            raise RequestError(404, f"no model named {name!r} is served; see GET /v1/models") from None

    def get(self, name: str, version: int | str | None = None) -> ServedModel:
        """A version by number (as OIP's strings too); none or "" is the highest served."""
        versions = self.versions(name)
        if version is None or version == "":
            return versions[max(versions)]
        number = int(version) if isinstance(version, int) or version.isdigit() else None
        if number not in versions:
            served = ", ".join(map(str, sorted(versions)))
            raise RequestError(404, f"model {name!r} has no version {version!r} served (serving {served})")
        return versions[number]

    def load(self, name: str, version_policy: VersionPolicy | None = None) -> list[int]:
        """Serve the versions of `name` the policy selects: keep those already served, build the new
        ones, publish the set at once, retire the rest. RepositoryError (nothing changed) if a
        version fails to load."""
        with self._lock:
            policy = version_policy or self.version_policy
            model_dir = self.root / name
            if name.startswith(".") or model_dir not in model_dirs(self.root):
                raise RepositoryError(f"no model folder {name!r} in the repository {self.root}")
            on_disk = version_dirs(model_dir)
            wanted = policy.select(on_disk)
            if not wanted:
                raise RepositoryError(
                    f"{model_dir}: no version to serve (on disk: {sorted(on_disk) or 'none'}; "
                    f"version policy: {policy.describe()})"
                )
            current = self._served.get(name, {})
            built: dict[int, ServedModel] = {}
            try:
                for v in wanted:
                    built[v] = current[v] if v in current else self._build(name, v, on_disk[v])
            except RepositoryError:
                for model in built.values():
                    if model not in current.values():
                        self._retire(model)
                raise
            self._served = {**self._served, name: built}  # the swap: one assignment
            self.generation += 1
            for v in on_disk.keys() - built.keys():
                self._reasons.setdefault((name, v), f"not selected by the version policy ({policy.describe()})")
            for v, model in current.items():
                if v not in built:
                    self._retire(model)
                    self._reasons[(name, v)] = f"unloaded: not selected by the version policy ({policy.describe()})"
            log.info("%s: serving versions %s (version policy: %s)", name, sorted(built), policy.describe())
            return sorted(built)

    def _build(self, name: str, version: int, version_dir: Path) -> ServedModel:
        s = self.serving
        try:
            manifest = load_version(version_dir)
            stages = None if s.remote_stages is None else s.remote_stages(manifest)
            runtime = ModelRuntime(manifest, version_dir, s.intra_op_threads, stages)
        except LOAD_ERRORS as e:
            self._reasons[(name, version)] = f"failed to load: {e}"
            raise RepositoryError(f"{name}/{version} failed to load: {e}") from None
        policy = self._policies.get(name, s.policy)
        try:
            model = s.served_model(runtime, policy)
        except ValueError as e:
            if policy == s.policy:
                self._reasons[(name, version)] = f"failed to load: {e}"
                raise RepositoryError(f"{name}/{version}: the server's operating point does not fit: {e}") from None
            log.warning("%s/%s: operating point %s does not fit (%s); using the server's", name, version, policy, e)
            model = s.served_model(runtime, s.policy)
        self._reasons.pop((name, version), None)
        log.info("loaded %s/%s from %s (%d exits)", name, version, version_dir, runtime.num_exits)
        return model

    def _retire(self, model: ServedModel) -> None:
        """A version no longer served; requests that hold it still finish on it."""
        model.close()
        self.serving.metrics.drop_model(model.labels, model.runtime.num_exits)
        log.info("unloaded %s/%s", model.name, model.version)

    def unload(self, name: str) -> list[int]:
        """Stop serving every version of `name`; unloading a model that is not served does nothing."""
        with self._lock:
            if name not in self._served and self.root / name not in model_dirs(self.root):
                raise RequestError(404, f"no model named {name!r} in the repository")
            current = self._served.get(name, {})
            self._served = {k: v for k, v in self._served.items() if k != name}
            self.generation += 1
            for v, model in current.items():
                self._retire(model)
                self._reasons[(name, v)] = "unloaded"
            return sorted(current)

    def close(self) -> None:
        """The server is stopping: every served version's monitor thread stops."""
        for model in self.served():
            model.close()

    def index(self) -> list[VersionState]:
        """Every version on disk or served, with its state."""
        found: dict[tuple[str, int], VersionState] = {}
        for model_dir in model_dirs(self.root):
            for v in version_dirs(model_dir):
                reason = self._reasons.get((model_dir.name, v), "not loaded")
                found[(model_dir.name, v)] = VersionState(model_dir.name, v, "UNAVAILABLE", reason)
        for model in self.served():
            found[(model.name, model.version)] = VersionState(model.name, model.version, "READY", "")
        return [found[k] for k in sorted(found)]

    def set_policy(self, name: str, policy: Policy) -> ServedModel:
        """The server's operating point for every served version of `name` (ValueError, nothing changed, if it
        does not fit one of them), kept for versions loaded later; returns the highest version. It takes
        no load lock (it runs on the event loop); a load already under way builds with the point before."""
        models = list(self.versions(name).values())
        before = [m.policy for m in models]
        try:
            for m in models:
                m.set_policy(policy)
        except ValueError:
            for m, p in zip(models, before, strict=True):
                m.set_policy(p)
            raise
        self._policies[name] = policy
        return self.get(name)
