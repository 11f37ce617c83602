#!/usr/bin/env bash
# Regenerate the committed protobuf message modules (_pb2.py and its .pyi stub) beside their .proto:
#   branchserve/server/oip/proto/grpc_predict_v2.proto  the Open Inference Protocol's gRPC messages
#   branchserve/repo/proto/onnx_graph.proto             the part of ONNX's format repo/blocked.py edits
# The OIP service itself is wired by hand in branchserve/server/oip/grpc_service.py (no _pb2_grpc
# module: grpcio has no type hints, and a hand-made handler table keeps the server under strict mypy).
# The generated files are committed, so neither a wheel build nor the Docker image needs protoc;
# tests/test_protos.py regenerates them into a temporary folder and fails if they differ.
# Needs grpcio-tools (in the dev extra). Usage: bash scripts/generate_protos.sh [OUT_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python -m grpc_tools.protoc -I . --python_out="$out" --pyi_out="$out" \
    branchserve/server/oip/proto/grpc_predict_v2.proto branchserve/repo/proto/onnx_graph.proto
