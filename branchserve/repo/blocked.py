"""A chain of stage sessions that hand their boundaries over in onnxruntime's blocked layout.

onnxruntime runs convolutions in a blocked channel layout (NCHWc) and reorders a graph's inputs
into it and its outputs out of it. A chain cut into stages so reorders every boundary twice, out at
the end of stage k and back in at the start of stage k + 1, where the full graph reorders nothing:
~4 µs of the shipped four-stage chain at batch 1, a third of its cost over the full graph. Here each
stage is optimized by onnxruntime as usual, the reorders at each cut are removed from the optimized
graphs, and the edited graphs are loaded with no further optimization: the boundary stays blocked
from one stage to the next (same shape, another memory order).

The optimized graphs are specific to this host's CPU (the block size follows its vector width), so
this is done at load, in the process that runs the chain, and only for a chain whose stages all run
here: a Ray stage on another host gets plain boundaries (`load_session`). A cut is blocked only
where the pattern is exactly as expected (a reorder producing the stage's output, a reorder the
only reader of the next stage's input); where the stage itself also reads the plain tensor (a head
without a convolution), its reorder stays and only the next stage's goes. The chain is adopted only
if it gives the same logits, bit for bit, as the plain chain on probe inputs; otherwise the plain
sessions are kept and a warning says so.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import onnxruntime as ort

from branchserve.repo.graphcalls import run_chain
from branchserve.repo.proto.onnx_graph_pb2 import GraphProto, ModelProto
from branchserve.repo.sessions import session_options

log = logging.getLogger(__name__)

NCHWC = "com.microsoft.nchwc"
PROBE_BATCHES = (1, 3)  # the server runs batch 1 bound and larger batches with numpy out
QUIET = 3  # severity "error" for the plain sessions: saving an NCHWc-optimized graph warns that it is host-specific


def load_stages(files: Sequence[Path], intra_op_threads: int = 1) -> list[ort.InferenceSession]:
    """Stage k of `files` reads stage k − 1's first output; blocked boundaries where they check out."""
    with tempfile.TemporaryDirectory(prefix="branchserve-blocked-") as tmp:
        plain, optimized = [], []
        for k, file in enumerate(files):
            opts = session_options(intra_op_threads)
            opts.optimized_model_filepath, opts.log_severity_level = f"{tmp}/{k}.onnx", QUIET
            plain.append(ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"]))
            optimized.append(ModelProto.FromString(Path(opts.optimized_model_filepath).read_bytes()))
    cuts = [k for k in range(len(files) - 1) if _blockable(optimized[k].graph, optimized[k + 1].graph)]
    if not cuts:
        return plain
    for k in cuts:
        _block_output(optimized[k].graph)
        _block_input(optimized[k + 1].graph)
    opts = session_options(intra_op_threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimized already
    blocked = [ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]) for m in optimized]
    if all(_same_logits(plain, blocked, batch) for batch in PROBE_BATCHES):
        return blocked
    log.warning("blocked boundaries change the logits on this host: the stages keep plain boundaries")
    return plain


def _reorder_out(graph: GraphProto) -> int | None:
    """Index of the node that reorders the graph's first output out of the blocked layout."""
    name = graph.output[0].name
    for i, node in enumerate(graph.node):
        if node.domain == NCHWC and node.op_type == "ReorderOutput" and list(node.output) == [name]:
            return i
    return None


def _reorder_in(graph: GraphProto) -> int | None:
    """Index of the node that reorders the graph's input into the blocked layout, if it is the input's only reader."""
    name = graph.input[0].name
    readers = [i for i, node in enumerate(graph.node) if name in node.input]
    if len(readers) != 1:
        return None
    node = graph.node[readers[0]]
    return (
        readers[0] if node.domain == NCHWC and node.op_type == "ReorderInput" and list(node.input) == [name] else None
    )


def _blockable(stage: GraphProto, next_stage: GraphProto) -> bool:
    return _reorder_out(stage) is not None and _reorder_in(next_stage) is not None


def _block_output(graph: GraphProto) -> None:
    """The blocked tensor the reorder out read becomes the graph output, under the output's name. The
    reorder stays only if the stage itself reads the plain tensor (a head without a convolution)."""
    i, name = cast(int, _reorder_out(graph)), graph.output[0].name
    read_here = any(name in node.input for node in graph.node)
    _rename(graph, name, f"{name}_plain")
    _rename(graph, graph.node[i].input[0], name)
    if not read_here:
        del graph.node[i]
    graph.output[0].type.tensor_type.ClearField("shape")  # channels padded to a whole block


def _block_input(graph: GraphProto) -> None:
    """Drop the reorder in: its readers read the graph input, which arrives blocked."""
    i, name = cast(int, _reorder_in(graph)), graph.input[0].name
    reordered = graph.node[i].output[0]
    del graph.node[i]
    _rename(graph, reordered, name)
    graph.input[0].type.tensor_type.ClearField("shape")


def _rename(graph: GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for values in (node.input, node.output):
            for j, value in enumerate(values):
                if value == old:
                    values[j] = new
    kept = [v for v in graph.value_info if v.name != old]  # shapes recorded for the old name no longer hold
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _same_logits(plain: Sequence[ort.InferenceSession], blocked: Sequence[ort.InferenceSession], batch: int) -> bool:
    shape = [batch if isinstance(d, str) or d is None else d for d in plain[0].get_inputs()[0].shape]
    x = np.random.default_rng(batch).standard_normal(shape).astype(np.float32)
    return all(np.array_equal(a, b) for a, b in zip(run_chain(plain, x), run_chain(blocked, x), strict=True))
