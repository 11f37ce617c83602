"""A chain of stage sessions that hand their boundaries over in onnxruntime's blocked layout.

onnxruntime runs convolutions in a blocked channel layout (NCHWc) and reorders a graph's inputs
into it and its outputs out of it. A chain cut into stages so reorders every boundary twice, out at
the end of stage k and back in at the start of stage k + 1, where the full graph reorders nothing:
~4 µs of the shipped four-stage chain at batch 1, a third of its cost over the full graph. Here each
stage is optimized by onnxruntime as usual, the reorders at each cut are removed from the optimized
graphs, and the edited graphs are loaded with no further optimization: the boundary stays blocked
from one stage to the next (in another memory order, its channels padded to a whole block).

The optimized graphs are specific to this host's CPU (the block size follows its vector width), so
this is done at load, in the process that runs the chain, and only for a chain whose stages all run
here: a Ray stage on another host gets plain boundaries (`load_session`). A cut is blocked only
where the pattern is exactly as expected (a reorder producing the stage's output, a reorder the
only reader of the next stage's input); where the stage itself also reads the plain tensor (a head
without a convolution), its reorder stays and only the next stage's goes. The chain is adopted only
if it gives the same logits, bit for bit, as the plain chain on probe inputs (run plainly, and bound
at batch 1); otherwise, or if onnxruntime rejects an edited graph (weights in external files, say),
the plain sessions are loaded and a warning says why.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from branchserve.repo.graphcalls import BoundChain, chain_feeds, run_chain
from branchserve.repo.proto.onnx_graph_pb2 import GraphProto, ModelProto, NodeProto
from branchserve.repo.sessions import load_session, session_options

log = logging.getLogger(__name__)

NCHWC = "com.microsoft.nchwc"
PROBE_BATCHES = (1, 3)  # the server runs batch 1 bound and larger batches with numpy out
QUIET = 3  # severity "error" for the reference sessions: saving an NCHWc-optimized graph warns that it is host-specific


def load_stages(
    files: Sequence[Path], input_shape: Sequence[int], intra_op_threads: int = 1
) -> list[ort.InferenceSession]:
    """Stage k of `files` reads stage k − 1's first output; blocked boundaries where they check out.
    `input_shape`: one input's, without the batch axis (probes use it)."""
    try:
        blocked = _blocked(files, input_shape, intra_op_threads)
        if blocked is not None:
            return blocked
    except Exception as e:  # an edited graph onnxruntime rejects (optimized in a way not foreseen here)
        log.warning("blocked boundaries failed (%s): the stages keep plain boundaries", e)
    return [load_session(file, intra_op_threads) for file in files]


def _blocked(
    files: Sequence[Path], input_shape: Sequence[int], intra_op_threads: int
) -> list[ort.InferenceSession] | None:
    """The chain with every cut that fits the pattern blocked, or None if no cut does or the logits change."""
    with tempfile.TemporaryDirectory(prefix="branchserve-blocked-") as tmp:
        reference, optimized = [], []
        for k, file in enumerate(files):
            opts = session_options(intra_op_threads)
            opts.optimized_model_filepath, opts.log_severity_level = f"{tmp}/{k}.onnx", QUIET
            reference.append(ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"]))
            optimized.append(ModelProto.FromString(Path(opts.optimized_model_filepath).read_bytes()))
    cuts = [(k, cut) for k in range(len(files) - 1) if (cut := _cut(optimized[k].graph, optimized[k + 1].graph))]
    if not cuts:
        return None
    for k, (reorder_out, reorder_in) in cuts:
        _block_output(optimized[k].graph, reorder_out)
        _block_input(optimized[k + 1].graph, reorder_in)
    opts = session_options(intra_op_threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimized already
    blocked = [ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]) for m in optimized]
    if all(_same_logits(reference, blocked, (batch, *input_shape)) for batch in PROBE_BATCHES):
        return blocked
    log.warning("blocked boundaries change the logits on this host: the stages keep plain boundaries")
    return None


def _cut(stage: GraphProto, next_stage: GraphProto) -> tuple[NodeProto, NodeProto] | None:
    """(the node of `stage` that reorders its first output out of the blocked layout, the node of
    `next_stage` that reorders its input in, being that input's only reader), if both exist."""
    output, input_ = stage.output[0].name, next_stage.input[0].name
    reorder_out = [n for n in stage.node if n.domain == NCHWC and n.op_type == "ReorderOutput" and n.output == [output]]
    readers = [n for n in next_stage.node if input_ in n.input]
    if len(reorder_out) != 1 or len(readers) != 1:
        return None
    reorder_in = readers[0]
    if reorder_in.domain != NCHWC or reorder_in.op_type != "ReorderInput" or reorder_in.input != [input_]:
        return None
    return reorder_out[0], reorder_in


def _block_output(graph: GraphProto, reorder: NodeProto) -> None:
    """The blocked tensor the reorder out read becomes the graph output, under the output's name
    (channels padded to a whole block). The reorder stays only if the stage itself reads the plain
    tensor (a head without a convolution), under a new name."""
    name = graph.output[0].name
    read_here = any(name in node.input for node in graph.node)
    _rename(graph, name, _unused(graph, f"{name}_plain"))
    _rename(graph, reorder.input[0], name)
    if not read_here:
        graph.node.remove(reorder)
    graph.output[0].type.tensor_type.ClearField("shape")


def _block_input(graph: GraphProto, reorder: NodeProto) -> None:
    """Drop the reorder in: its readers read the graph input, which arrives blocked."""
    name, reordered = graph.input[0].name, reorder.output[0]
    graph.node.remove(reorder)
    _rename(graph, reordered, name)
    graph.input[0].type.tensor_type.ClearField("shape")


def _unused(graph: GraphProto, name: str) -> str:
    taken = {v for node in graph.node for v in (*node.input, *node.output)} | {v.name for v in graph.input}
    while name in taken:
        name += "_"
    return name


def _rename(graph: GraphProto, old: str, new: str) -> None:
    """Rename a value among the graph's nodes (not its inputs and outputs, which keep their names)."""
    for node in graph.node:
        for values in (node.input, node.output):
            for j, value in enumerate(values):
                if value == old:
                    values[j] = new
    kept = [v for v in graph.value_info if v.name != old]  # shapes recorded for the old name no longer hold
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _same_logits(
    reference: Sequence[ort.InferenceSession], blocked: Sequence[ort.InferenceSession], shape: Sequence[int]
) -> bool:
    """Every exit's logits equal, bit for bit, on a random input: run plainly, and bound at batch 1 as
    the server runs it."""
    x = np.random.default_rng(shape[0]).standard_normal(shape).astype(np.float32)
    want = run_chain(reference, x)
    got = [run_chain(blocked, x)]
    if shape[0] == 1:
        bound = BoundChain(blocked, x, chain_feeds(blocked))
        for call in bound.calls:
            call()
        got.append([out[s.get_outputs()[-1].name] for out, s in zip(bound.outputs, blocked, strict=True)])
    return all(np.array_equal(a, b) for logits in got for a, b in zip(logits, want, strict=True))
