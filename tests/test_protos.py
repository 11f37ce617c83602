"""The committed protobuf code: it is what scripts/generate_protos.sh makes of the .protos today. The
OIP .proto is wire-compatible with the one tritonclient speaks (same messages, field names, numbers
and types), so `tritonclient.grpc` works unmodified; the ONNX subset declares its fields as ONNX does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import service_pb2

from branchserve.repo.proto import onnx_graph_pb2
from branchserve.server.oip.grpc_service import SERVICE_NAME
from branchserve.server.oip.proto import grpc_predict_v2_pb2 as ours

ROOT = Path(__file__).resolve().parents[1]
GENERATED = [
    Path("branchserve/server/oip/proto") / name for name in ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi")
] + [Path("branchserve/repo/proto") / name for name in ("onnx_graph_pb2.py", "onnx_graph_pb2.pyi")]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("proto")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # this venv's python
    subprocess.run(["bash", str(ROOT / "scripts" / "generate_protos.sh"), str(out)], check=True, cwd=ROOT, env=env)
    return out


def test_committed_code_is_what_the_script_generates(regenerated: Path) -> None:
    for path in GENERATED:
        fresh = (regenerated / path).read_text()
        assert fresh == (ROOT / path).read_text(), f"{path} is stale: run scripts/generate_protos.sh"


def fields(message: Descriptor) -> dict[str, tuple[int, int, bool, str]]:
    """Each field's number, type, whether it repeats, and message type (named within its package)."""
    return {
        f.name: (f.number, f.type, f.is_repeated, relative(f.message_type) if f.message_type else "")
        for f in message.fields
    }


def relative(message: Descriptor) -> str:
    return message.full_name.removeprefix(message.file.package + ".")


def test_every_message_and_rpc_matches_tritonclients() -> None:
    """Importing both in one process is itself part of the test: our package never clashes with theirs."""
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    triton = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert triton.full_name == SERVICE_NAME
    checked = set()
    pending = [(m.input_type, triton.methods_by_name[m.name].input_type) for m in service.methods]
    pending += [(m.output_type, triton.methods_by_name[m.name].output_type) for m in service.methods]
    while pending:
        mine, theirs = pending.pop()
        if mine.name in checked:
            continue
        checked.add(mine.name)
        their_fields = fields(theirs)
        for name, spec in fields(mine).items():
            assert their_fields.get(name) == spec, (mine.full_name, name, spec, their_fields.get(name))
        pending += [(f.message_type, theirs.fields_by_name[f.name].message_type) for f in mine.fields if f.message_type]
    assert {"ModelInferRequest", "InferParameter", "InferTensorContents", "InferOutputTensor"} <= checked
    assert [m.name for m in service.methods] == [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    ]


def test_the_onnx_subset_declares_its_fields_as_onnx_does() -> None:
    """Importing both in one process is part of the test: the train extra loads onnx beside it."""
    pending = [
        (m, onnx.onnx_ml_pb2.DESCRIPTOR.message_types_by_name[n])
        for n, m in onnx_graph_pb2.DESCRIPTOR.message_types_by_name.items()
    ]
    checked = set()
    while pending:
        mine, theirs = pending.pop()
        checked.add(relative(mine))
        their_fields = fields(theirs)
        for name, spec in fields(mine).items():
            assert their_fields.get(name) == spec, (mine.full_name, name, spec, their_fields.get(name))
        pending += [(n, theirs.nested_types_by_name[n.name]) for n in mine.nested_types]
    assert checked == {
        "ModelProto",
        "GraphProto",
        "NodeProto",
        "ValueInfoProto",
        "TypeProto",
        "TypeProto.Tensor",
        "TensorShapeProto",
    }
