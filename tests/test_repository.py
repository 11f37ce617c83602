"""Loading a model repository: the latest version is served, and corrupt or mismatched versions are
refused with a message that says what is wrong."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from branchserve.repo.loading import load_repository
from branchserve.repo.manifest import MANIFEST_FILE, RepositoryError, sha256_of


@pytest.fixture
def repo(tiny_version: Path, tmp_path: Path) -> Path:
    """A private copy of the exported repository, free to break."""
    root = tmp_path / "models"
    shutil.copytree(tiny_version, root / "tiny" / "1")
    return root


def edit_manifest(version_dir: Path, change: Callable[[dict], None]) -> None:
    path = version_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def replace_file(version_dir: Path, file: str, data: bytes) -> None:
    """Overwrite a graph and record its new hash, so only what changed inside can be caught."""
    (version_dir / file).write_bytes(data)

    def rehash(m: dict) -> None:
        for spec in [*m["stages"], m["full_graph"]]:
            if spec["file"] == file:
                spec["sha256"] = sha256_of(version_dir / file)

    edit_manifest(version_dir, rehash)


def rewrite_graph(version_dir: Path, file: str, change: Callable[[onnx.ModelProto], None]) -> None:
    proto = onnx.load(version_dir / file)
    change(proto)
    replace_file(version_dir, file, proto.SerializeToString())


def rename_output(proto: onnx.ModelProto, old: str, new: str) -> None:
    for node in proto.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
    for out in proto.graph.output:
        if out.name == old:
            out.name = new


def fix_batch(proto: onnx.ModelProto) -> None:
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1


def test_loads_the_latest_version(repo: Path) -> None:
    v1 = repo / "tiny" / "1"
    shutil.copytree(v1, repo / "tiny" / "2")
    edit_manifest(repo / "tiny" / "2", lambda m: m.update(version=2))
    shutil.copytree(v1, repo / "tiny" / ".export-3")  # an export in progress is not a version
    (repo / "tiny" / "10-old").mkdir()
    models = load_repository(repo)
    assert list(models) == ["tiny"]
    manifest, version_dir = models["tiny"]
    assert version_dir == repo / "tiny" / "2" and manifest.version == 2 and manifest.name == "tiny"


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing stage file": (lambda v: (v / "stage_1.onnx").unlink(), r"names stage_1\.onnx, which is missing"),
    "changed stage file": (
        lambda v: (v / "stage_2.onnx").write_bytes((v / "stage_2.onnx").read_bytes() + b"\0"),
        r"stage_2\.onnx does not match its sha256",
    ),
    "graph output renamed": (
        lambda v: rewrite_graph(v, "stage_1.onnx", lambda p: rename_output(p, "logits_1", "probs_1")),
        r"stage_1\.onnx: graph outputs are \['boundary_1', 'probs_1'\], but the manifest says \['boundary_1', 'logits_1'\]",
    ),
    "manifest output renamed": (
        lambda v: edit_manifest(v, lambda m: m["stages"][3].update(logits_output="scores")),
        r"stage_3\.onnx: graph outputs are \['logits_3'\], but the manifest says \['scores'\]",
    ),
    "stage fed the wrong tensor": (
        lambda v: edit_manifest(v, lambda m: m["stages"][2].update(input_name="boundary_0")),
        r"stage number 2 \(index 2\) must take 'boundary_1', the tensor before it, not 'boundary_0'",
    ),
    "full graph with a fixed batch": (
        lambda v: rewrite_graph(v, "full.onnx", fix_batch),
        r"full\.onnx: input shape is \[1, 1, 28, 28\], expected a dynamic batch axis",
    ),
    "unloadable graph": (
        lambda v: replace_file(v, "stage_0.onnx", b"not an onnx model"),
        r"stage_0\.onnx: onnxruntime cannot load it",
    ),
    "file outside the version": (
        lambda v: edit_manifest(v, lambda m: m["full_graph"].update(file="../full.onnx")),
        r"file '\.\./full\.onnx' must be a plain name",
    ),
    "wrong schema version": (
        lambda v: edit_manifest(v, lambda m: m.update(schema_version=3)),
        r"invalid manifest at 'schema_version'",
    ),
    "not JSON": (lambda v: (v / MANIFEST_FILE).write_text("{"), r"invalid manifest"),
    "no manifest": (lambda v: (v / MANIFEST_FILE).unlink(), r"no manifest\.json"),
    "default not on the frontier": (
        lambda v: edit_manifest(v, lambda m: m.update(default_operating_point="turbo")),
        r"default operating point 'turbo' is not on the frontier",
    ),
    "one threshold short": (
        lambda v: edit_manifest(v, lambda m: m["frontier"][0]["thresholds"].pop()),
        r"does not have one threshold per exit",
    ),
    "version folder renamed": (
        lambda v: v.rename(v.parent / "7"),
        r"says tiny/1 but lives in .*tiny/7",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_rejects_a_corrupt_or_mismatched_version(repo: Path, corruption: str) -> None:
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(repo / "tiny" / "1")
    with pytest.raises(RepositoryError, match=message):
        load_repository(repo)


def test_rejects_an_empty_or_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="is not a folder"):
        load_repository(tmp_path / "absent")
    with pytest.raises(RepositoryError, match="holds no models"):
        load_repository(tmp_path)
    (tmp_path / "tiny").mkdir()
    with pytest.raises(RepositoryError, match=r"tiny: no version folders"):
        load_repository(tmp_path)
