"""Blocked boundaries (repo/blocked.py): on real exported chains the stages hand over their
boundaries in onnxruntime's blocked layout (a reordering of the plain tensor) and every exit's
logits stay bit-identical to the plain chain's; a chain without the pattern keeps its graphs."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from branchserve.repo import blocked as blocked_module
from branchserve.repo.blocked import load_stages
from branchserve.repo.graphcalls import run_chain
from branchserve.repo.loading import load_version
from branchserve.repo.proto.onnx_graph_pb2 import ModelProto
from branchserve.repo.sessions import load_session
from branchserve.server.runtime import ModelRuntime

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "fmnist-resnet" / "3"


def stage_files(version_dir: Path) -> list[Path]:
    return [version_dir / s.file for s in load_version(version_dir).stages]


@pytest.mark.parametrize("batch", [1, 5])
def test_boundaries_are_blocked_and_logits_bit_identical(batch: int) -> None:
    """The shipped model's boundaries have 32, 48 and 96 channels: whole blocks on an AVX-512 CPU
    (16 channels, the test machines) or an AVX2 one (8), so each is a reordering of the plain tensor."""
    files, shape = stage_files(SHIPPED), load_version(SHIPPED).input.shape
    blocked, plain = load_stages(files, shape), [load_session(f) for f in files]
    x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
    a = p = x
    for k in range(len(files) - 1):  # each boundary: the plain tensor's values, in another order
        a = blocked[k].run(None, {blocked[k].get_inputs()[0].name: a})[0]
        p = plain[k].run(None, {plain[k].get_inputs()[0].name: p})[0]
        assert not np.array_equal(a, p), f"boundary {k} is not blocked"
        assert np.array_equal(np.sort(a, axis=None), np.sort(p, axis=None))
    for k, (got, want) in enumerate(zip(run_chain(blocked, x), run_chain(plain, x), strict=True)):
        assert np.array_equal(got, want), f"exit {k}"


def test_the_server_runs_blocked_stages_and_answers_as_the_plain_chain(tiny_version: Path) -> None:
    """The tiny model's first boundary has 8 channels, its others 16: on an AVX-512 host (16-channel
    blocks, the test machines) the first cut stays plain and the others are blocked."""
    runtime = ModelRuntime(load_version(tiny_version), tiny_version)
    plain_stages = [load_session(f) for f in stage_files(tiny_version)]
    x = np.random.default_rng(0).standard_normal((1, *runtime.input_shape)).astype(np.float32)
    served, plain, blocked_cuts = x, x, []
    for k in range(runtime.num_exits - 1):
        served = cast(np.ndarray, runtime.stages[k](served)[1])
        plain = plain_stages[k].run(None, {plain_stages[k].get_inputs()[0].name: plain})[0]
        if not np.array_equal(served, plain):
            blocked_cuts.append(k)
    assert blocked_cuts, "no boundary of the served chain is blocked"
    want = run_chain(plain_stages, x)
    never = [2.0] * runtime.num_exits
    for last in range(runtime.num_exits):  # bound at batch 1, stopped at each exit
        assert np.array_equal(runtime.run(x, never, last).logits, want[last])
    three = np.repeat(x, 3, axis=0)  # numpy in and out at larger batches
    assert np.array_equal(runtime.run(three, never, runtime.num_exits - 1).logits, np.repeat(want[-1], 3, axis=0))


def dense_stage(tmp_path: Path, k: int, width: int, last: bool) -> Path:
    """A stage with no convolution (so no blocked layout): boundary = relu(x @ w), logits = boundary @ v."""
    rng = np.random.default_rng(k)
    weights = [
        numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((width, 3)).astype(np.float32), "v"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], [f"boundary_{k}"]),
        helper.make_node("MatMul", [f"boundary_{k}", "v"], [f"logits_{k}"]),
    ]
    outputs = [helper.make_tensor_value_info(f"logits_{k}", TensorProto.FLOAT, ["n", 3])]
    if not last:
        outputs.insert(0, helper.make_tensor_value_info(f"boundary_{k}", TensorProto.FLOAT, ["n", width]))
    graph = helper.make_graph(
        nodes, f"stage_{k}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])], outputs, weights
    )
    path = tmp_path / f"stage_{k}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_chain_without_blocked_layout_keeps_its_graphs(tmp_path: Path) -> None:
    files = [dense_stage(tmp_path, k, 16, last=k == 2) for k in range(3)]
    stages, plain = load_stages(files, (16,)), [load_session(f) for f in files]
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    boundary = stages[0].run(None, {"x": x})[0]
    assert np.array_equal(boundary, plain[0].run(None, {"x": x})[0])
    for got, want in zip(run_chain(stages, x), run_chain(plain, x), strict=True):
        assert np.array_equal(got, want)


def conv_chain(tmp_path: Path, head_output: str, height: int | str = 8) -> list[Path]:
    """Two stages on (n, 3, 8, 8): a 32-channel convolution whose boundary stage 0's head flattens
    as it is (so the stage reads the plain tensor, into a value named `head_output`), then another
    convolution and a pooled head."""
    rng = np.random.default_rng(0)

    def weights(name: str, *shape: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name))
        return name

    def value(name: str, *shape: int | str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))

    inits: list[onnx.TensorProto] = []
    nodes = [
        helper.make_node("Conv", ["x", weights("c0", 32, 3, 3, 3), weights("b0", 32)], ["a0"], pads=[1] * 4),
        helper.make_node("Relu", ["a0"], ["boundary_0"]),
        helper.make_node("Flatten", ["boundary_0"], [head_output]),
        helper.make_node("Gemm", [head_output, weights("h0", 5, 32 * 64)], ["logits_0"], transB=1),
    ]
    outputs = [value("boundary_0", "n", 32, 8, 8), value("logits_0", "n", 5)]
    first = helper.make_graph(nodes, "stage_0", [value("x", "n", 3, height, 8)], outputs, inits)
    inits = []
    nodes = [
        helper.make_node("Conv", ["boundary_0", weights("c1", 32, 32, 3, 3), weights("b1", 32)], ["a1"], pads=[1] * 4),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", weights("h1", 5, 32)], ["logits_1"], transB=1),
    ]
    second = helper.make_graph(
        nodes, "stage_1", [value("boundary_0", "n", 32, 8, 8)], [value("logits_1", "n", 5)], inits
    )
    files = [tmp_path / "stage_0.onnx", tmp_path / "stage_1.onnx"]
    for graph, file in zip([first, second], files, strict=True):
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), file)
    return files


def blocked_first_boundary(stages: list[ort.InferenceSession], files: list[Path], x: np.ndarray) -> bool:
    """Whether the chain's first boundary differs from the plain graph's, its logits being bit-identical."""
    plain = [load_session(f) for f in files]
    for got, want in zip(run_chain(stages, x), run_chain(plain, x), strict=True):
        assert np.array_equal(got, want)
    return not np.array_equal(stages[0].run(None, {"x": x})[0], plain[0].run(None, {"x": x})[0])


@pytest.mark.parametrize("head_output", ["flat", "boundary_0_plain"])
def test_a_head_reading_the_plain_boundary_keeps_its_reorder(tmp_path: Path, head_output: str) -> None:
    """Only the next stage's reorder goes; the kept one gets a name no value of the stage has."""
    files = conv_chain(tmp_path, head_output)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert blocked_first_boundary(load_stages(files, (3, 8, 8)), files, x)


def test_probes_take_the_models_input_shape_not_the_graphs_free_axes(tmp_path: Path) -> None:
    files = conv_chain(tmp_path, "flat", height="h")
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert blocked_first_boundary(load_stages(files, (3, 8, 8)), files, x)


def test_an_edit_onnxruntime_rejects_keeps_plain_boundaries(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Weights in external files: the optimized copy points at them relative to a folder it is not in."""
    files = conv_chain(tmp_path, "flat")
    for file in files:
        onnx.save(onnx.load(file), file, save_as_external_data=True, location=f"{file.stem}.data", size_threshold=0)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert not blocked_first_boundary(load_stages(files, (3, 8, 8)), files, x)
    assert "blocked boundaries failed" in caplog.text


def test_logits_that_change_keep_plain_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The guard itself: no host here changes the logits, so the comparison is made to say they differ."""
    files = conv_chain(tmp_path, "flat")
    monkeypatch.setattr(blocked_module, "_same_logits", lambda *_: False)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert not blocked_first_boundary(load_stages(files, (3, 8, 8)), files, x)
    assert "blocked boundaries change the logits" in caplog.text


def test_the_graph_subset_reads_and_writes_a_model_whole() -> None:
    """Undeclared fields (weights, attributes, opsets) survive a read and write unchanged."""
    original = (SHIPPED / "stage_1.onnx").read_bytes()
    rewritten = ModelProto.FromString(original).SerializeToString()
    assert onnx.load_from_string(rewritten) == onnx.load_from_string(original)
