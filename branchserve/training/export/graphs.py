"""The ONNX graphs of a version: one full graph exported from torch, and the stage graphs cut out of it.

The model is exported once, as one graph whose outputs are every exit's logits and every stage
boundary tensor; the stage graphs are cut out of that graph (`onnx.utils.Extractor`), so they hold
the very same nodes and weights and only the cut decides what runs. ORT computes a whole graph
whatever outputs are asked for, so the cut is what lets an early exit skip the later stages.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import onnx
import onnx.utils
import torch
from torch import Tensor, nn

from branchserve.repo.manifest import InputSpec
from branchserve.training.export import ExportError
from branchserve.training.model import BranchedNet, ExitHead

OPSET = 18
FULL_FILE = "full.onnx"


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
    original stays the reference the exported graphs are checked against. (A cut backbone's final
    exit is its own classifier, which is left as it is.)"""
    copy = deepcopy(model).eval()
    x = torch.zeros(1, *spec.shape)
    with torch.no_grad():
        for k, head in enumerate(copy.heads):
            x, _ = copy.run_stage(k, x)
            if not isinstance(head, ExitHead):
                continue
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


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence what torch's exporter prints about itself rather than this model: torch.export's
    deprecation of `LeafSpec`, and a log line per torchvision op it skips when torchvision is absent."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")

    def not_torchvision(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")

    registration.addFilter(not_torchvision)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            yield
    finally:
        registration.removeFilter(not_torchvision)


def export_full_graph(model: BranchedNet, spec: InputSpec) -> onnx.ModelProto:
    """One graph, dynamic batch axis, through torch's dynamo exporter."""
    n = len(model.heads)
    outputs = [logits_name(k) for k in range(n)] + [boundary_name(k) for k in range(n - 1)]
    with quiet_exporter():
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
        stage = extractor.extract_model(inputs, outputs)
        check_cut(stage, k)
        stages.append(route_input_through_pool(stage))
    return stages


def check_cut(stage: onnx.ModelProto, k: int) -> None:
    """A stage must compute from its one input and its own weights. Where the network is not a chain
    at the cut, the extractor pulls in nodes from before it that read tensors the stage is never
    given: refuse that split by name, rather than ship stages that cannot run or compute otherwise."""
    graph = stage.graph
    known = {t.name for t in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        if missing := [name for name in node.input if name not in known]:
            raise ExportError(
                f"stage {k} is not a chain at its cut: node {node.name!r} needs {missing[0]!r}, which is computed "
                f"before {graph.input[0].name!r} and does not pass through it; put the exits after modules every "
                "path runs through"
            )
        known.update(node.output)


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


def write_graphs(model: BranchedNet, spec: InputSpec, folder: Path) -> None:
    """The full graph and one graph per stage into `folder`, each through the checker first."""
    full = export_full_graph(model, spec)
    check_graph(full, FULL_FILE)
    onnx.save(full, folder / FULL_FILE)
    for k, stage in enumerate(split_stages(full, len(model.heads), spec.name)):
        check_graph(stage, stage_file(k))
        onnx.save(stage, folder / stage_file(k))
