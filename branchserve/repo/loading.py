"""A model repository on disk: `<root>/<name>/<version>/`; `versions.py` says which versions are served.

`load_manifest` checks what can be checked without running anything (schema, files, hashes);
`load_version` adds what only the graphs themselves can say: that every ONNX file really takes
and yields the tensors the manifest names, with a dynamic batch axis, so a server never
discovers a renamed output on its first request.
"""

from __future__ import annotations

from pathlib import Path

from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, InvalidProtobuf

from branchserve.repo.manifest import Manifest, RepositoryError, load_manifest
from branchserve.repo.sessions import load_session


def _graph_names(path: Path) -> tuple[list[str], list[str], list[int | str | None]]:
    """Input names, output names and the first input's shape, as onnxruntime reads the file (a dynamic
    axis is its name, or None)."""
    try:
        session = load_session(path)
    except (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf) as e:
        raise RepositoryError(f"{path}: onnxruntime cannot load it: {e}") from None
    inputs = session.get_inputs()
    return [i.name for i in inputs], [o.name for o in session.get_outputs()], list(inputs[0].shape)


def _expect(path: Path, what: str, actual: list[str], expected: list[str]) -> None:
    if actual != expected:
        raise RepositoryError(f"{path}: graph {what} are {actual}, but the manifest says {expected}")


def check_graphs(manifest: Manifest, version_dir: Path) -> None:
    """Open every graph and compare its tensor names and input shape with the manifest's."""
    for stage in manifest.stages:
        path = version_dir / stage.file
        inputs, outputs, _ = _graph_names(path)
        _expect(path, "inputs", inputs, [stage.input_name])
        _expect(path, "outputs", outputs, [n for n in (stage.boundary_output, stage.logits_output) if n])
    full = manifest.full_graph
    path = version_dir / full.file
    inputs, outputs, shape = _graph_names(path)
    _expect(path, "inputs", inputs, [full.input_name])
    _expect(path, "outputs", sorted(outputs), sorted(full.logits_outputs + full.boundary_outputs))
    if len(shape) != 4 or isinstance(shape[0], int) or tuple(shape[1:]) != manifest.input.shape:
        raise RepositoryError(
            f"{path}: input shape is {shape}, expected a dynamic batch axis then {list(manifest.input.shape)}"
        )


def load_version(version_dir: Path) -> Manifest:
    manifest = load_manifest(version_dir)
    check_graphs(manifest, version_dir)
    return manifest


def version_dirs(model_dir: Path) -> dict[int, Path]:
    """Every version folder of a model by number; anything not a number (e.g. an export in progress) is ignored."""
    return {int(p.name): p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()}


def latest_version(model_dir: Path) -> Path:
    """The highest-numbered version folder."""
    versions = version_dirs(model_dir)
    if not versions:
        raise RepositoryError(f"{model_dir}: no version folders (expected {model_dir}/1/manifest.json)")
    return versions[max(versions)]


def model_dirs(root: Path) -> list[Path]:
    """The model folders of a repository, by name; refuses a repository that is not a folder."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a folder (resolved to {root.resolve()})")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_repository(root: Path) -> dict[str, tuple[Manifest, Path]]:
    """Every model in `root` at its latest version, fully checked; refuses an empty or broken repository."""
    models = {}
    for model_dir in model_dirs(root):
        version_dir = latest_version(model_dir)
        models[model_dir.name] = (load_version(version_dir), version_dir)
    if not models:
        raise RepositoryError(f"model repository {root} holds no models (expected {root}/<name>/<version>/)")
    return models
