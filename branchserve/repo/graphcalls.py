"""How a graph is called: the calls the server makes, which `calibrate` times, so prices are real.

Both go straight to onnxruntime's C binding (`InferenceSession._sess`). The Python wrapper's
`run` and `run_with_iobinding` first check graph capture, input names and OrtValue ownership:
3–8 µs per call on the test host, paid once per stage by a chain but once in all by the full
graph, and a cost of the wrapper rather than of the graphs. (With `RunOptions` lacking a
`gpu_graph_id` entry, onnxruntime 1.32's lookup in `run_with_iobinding` raises and catches a C++
exception: ~90 µs per call.)

At batch 1 a graph runs bound (`BoundChain`): its outputs are written into buffers allocated
once, and each stage's boundary buffer is the next stage's input. A `run` that returns numpy
arrays allocates every output on every call: ~3–4 µs per stage call at batch 1 here.

`run_chain` is the plain reference the others are checked against: `session.run`, stage after stage.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import onnxruntime as ort

from branchserve.repo.sessions import RUN_OPTIONS
from branchserve.repo.tensors import FloatArray


def graph_call(session: ort.InferenceSession, outputs: Sequence[str]) -> Callable[[str, FloatArray], list[FloatArray]]:
    """`call(input_name, x)` → the named outputs as new numpy arrays."""
    run, names = session._sess.run, list(outputs)
    return lambda input_name, x: cast(list[FloatArray], run(names, {input_name: x}, RUN_OPTIONS))


def chain_feeds(stages: Sequence[ort.InferenceSession]) -> list[str]:
    """What each stage but the last hands the next, by the export's convention: its first output."""
    return [s.get_outputs()[0].name for s in stages[:-1]]


def run_chain(stages: Sequence[ort.InferenceSession], x: FloatArray) -> list[FloatArray]:
    """Every exit's logits, feeding each stage's boundary tensor to the next stage."""
    logits = []
    for k, session in enumerate(stages):
        out = cast(list[FloatArray], session.run(None, {session.get_inputs()[0].name: x}, RUN_OPTIONS))
        if k < len(stages) - 1:
            x = out[0]
        logits.append(out[-1])
    return logits


class _BoundCall(functools.partial[None]):
    """One bound run, `run_with_iobinding(binding, RUN_OPTIONS)`, called from C without a Python
    frame of its own. It holds the buffers its binding points into: onnxruntime does not own numpy
    memory, so a call that outlived its chain would write into freed memory."""

    keep: list[ort.OrtValue]

    def __new__(cls, session: ort.InferenceSession, binding: ort.IOBinding, keep: list[ort.OrtValue]) -> _BoundCall:
        call = super().__new__(cls, session._sess.run_with_iobinding, binding._iobinding, RUN_OPTIONS)
        call.keep = keep
        return call


class BoundChain:
    """Graphs bound, in order, to buffers allocated once for the shape of `x`: write the input into
    `input`, call `calls[k]()` for k = 0, 1, …, and read graph k's outputs in `outputs[k]` (by
    name). `feeds[k]` names graph k's output that graph k + 1 reads, so nothing is copied between
    stages. Buffers are reused by every call: not thread-safe, one chain per thread."""

    def __init__(self, sessions: Sequence[ort.InferenceSession], x: FloatArray, feeds: Sequence[str]) -> None:
        self.input: FloatArray = np.array(x, np.float32, order="C")
        self._values: list[ort.OrtValue] = []  # every bound OrtValue (each holds its numpy buffer)
        self.calls: list[Callable[[], None]] = []
        self.outputs: list[dict[str, FloatArray]] = []
        feed, array = self._value(self.input), self.input
        for k, session in enumerate(sessions):
            binding = session.io_binding()
            binding.bind_ortvalue_input(session.get_inputs()[0].name, feed)
            names = [o.name for o in session.get_outputs()]
            shapes = cast(list[FloatArray], session.run(names, {session.get_inputs()[0].name: array}, RUN_OPTIONS))
            buffers = {name: np.full_like(a, np.nan) for name, a in zip(names, shapes, strict=True)}  # NaN until run
            values = {name: self._value(b) for name, b in buffers.items()}
            for name, value in values.items():
                binding.bind_ortvalue_output(name, value)
            self.calls.append(_BoundCall(session, binding, self._values))
            self.outputs.append(buffers)
            if k < len(feeds):
                feed, array = values[feeds[k]], shapes[names.index(feeds[k])]

    def _value(self, array: FloatArray) -> ort.OrtValue:
        value = ort.OrtValue.ortvalue_from_numpy(array)
        self._values.append(value)
        return value
