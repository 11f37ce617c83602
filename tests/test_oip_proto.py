"""The committed OIP protobuf code: it is what scripts/generate_oip_proto.sh makes of the .proto today,
and the .proto is wire-compatible with the one tritonclient speaks (same messages, field names,
numbers and types), so `tritonclient.grpc` works unmodified."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from tritonclient.grpc import service_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = Path("branchserve/server/oip/proto")
GENERATED = ["grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi"]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("proto")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # this venv's python
    subprocess.run(["bash", str(ROOT / "scripts" / "generate_oip_proto.sh"), str(out)], check=True, cwd=ROOT, env=env)
    return out


def test_committed_code_is_what_the_script_generates(regenerated: Path) -> None:
    for name in GENERATED:
        fresh = (regenerated / PROTO_DIR / name).read_text()
        assert fresh == (ROOT / PROTO_DIR / name).read_text(), f"{name} is stale: run scripts/generate_oip_proto.sh"


def our_messages(tmp_path: Path) -> descriptor_pool.DescriptorPool:
    """Our .proto in a pool of its own: the default pool already holds tritonclient's `inference.*`."""
    out = tmp_path / "set.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            f"--descriptor_set_out={out}",
            str(PROTO_DIR / "grpc_predict_v2.proto"),
        ],
        check=True,
        cwd=ROOT,
    )
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        pool.Add(file)
    return pool


def fields(message: object) -> dict[str, tuple[int, int, str]]:
    return {f.name: (f.number, f.type, f.message_type.full_name if f.message_type else "") for f in message.fields}


def test_every_message_and_rpc_matches_tritonclients(tmp_path: Path) -> None:
    ours = our_messages(tmp_path)
    service = ours.FindServiceByName("inference.GRPCInferenceService")
    triton = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    checked = set()
    for method in service.methods:
        theirs = triton.methods_by_name[method.name]
        for mine, other in ((method.input_type, theirs.input_type), (method.output_type, theirs.output_type)):
            pending = [(mine, other)]
            while pending:
                a, b = pending.pop()
                if a.full_name in checked:
                    continue
                checked.add(a.full_name)
                mine_fields, their_fields = fields(a), fields(b)
                for name, spec in mine_fields.items():
                    assert their_fields.get(name) == spec, (a.full_name, name, spec, their_fields.get(name))
                pending += [(f.message_type, b.fields_by_name[f.name].message_type) for f in a.fields if f.message_type]
    assert {"inference.ModelInferRequest", "inference.InferParameter", "inference.InferTensorContents"} <= checked
    assert [m.name for m in service.methods] == [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    ]
