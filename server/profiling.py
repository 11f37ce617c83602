"""Run a version's stage graphs as a chain, and measure what each stage costs on this host.

Latency is measured with the sessions the server uses (one intra-op thread, no spinning), on
random inputs: a CNN's cost does not depend on pixel values, so re-measuring on another machine
needs neither torch nor the dataset. The chain and the full graph are timed in the same loop,
alternating which goes first, so a busy neighbour slows both alike.

Graphs are timed through IOBindings into buffers allocated once (`BoundGraphs`): a plain
`session.run` allocates its outputs and hands them back as new numpy arrays on every call, which
on the shipped model cost up to ~35 µs per call at batch 1: the four-stage chain is 1.09× the
full graph that way against 1.05× bound (bench/staged_vs_full.py shows both).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from server.manifest import CostProfile, StageLatency
from server.sessions import load_session

INTRA_OP_THREADS = 1


def run_chain(stages: Sequence[ort.InferenceSession], x: np.ndarray) -> list[np.ndarray]:
    """Every exit's logits, feeding each stage's boundary tensor to the next stage."""
    logits = []
    for k, session in enumerate(stages):
        out = session.run(None, {session.get_inputs()[0].name: x})
        if k < len(stages) - 1:
            x = out[0]
        logits.append(out[-1])
    return logits


def describe_host() -> str:
    """CPU model and OS, enough to tell whether two cost profiles are comparable."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}; {platform.system()} {platform.release()}; Python {platform.python_version()}"


def _median_ms(samples: list[int]) -> float:
    return float(np.median(samples)) / 1e6


class TimedGraphs:
    """Times a chain of stage graphs and the full graph; subclasses say how one graph runs."""

    stages: list[ort.InferenceSession]

    def run_stage(self, k: int) -> None:
        raise NotImplementedError

    def run_full(self) -> None:
        raise NotImplementedError

    def time_chain(self) -> list[int]:
        """Run every stage in order; nanoseconds each took."""
        times = []
        for k in range(len(self.stages)):
            t0 = time.perf_counter_ns()
            self.run_stage(k)
            times.append(time.perf_counter_ns() - t0)
        return times

    def time_full(self) -> int:
        t0 = time.perf_counter_ns()
        self.run_full()
        return time.perf_counter_ns() - t0


class BoundGraphs(TimedGraphs):
    """The chain of stage graphs and the full graph bound to buffers allocated once for one input
    batch; each stage's boundary output buffer is the next stage's input, so nothing is copied
    between stages. Not thread-safe: one per thread."""

    def __init__(self, stages: Sequence[ort.InferenceSession], full: ort.InferenceSession, x: np.ndarray) -> None:
        self._keep: list[np.ndarray] = []  # buffers the OrtValues point into
        self.stages, self.full = list(stages), full
        feed = first = self._value(np.ascontiguousarray(x))
        self.stage_bindings = []
        for session in self.stages:
            binding, outputs = self._bind(session, feed)
            self.stage_bindings.append(binding)
            feed = outputs[0]
        self.full_binding, _ = self._bind(full, first)

    def _value(self, array: np.ndarray) -> ort.OrtValue:
        self._keep.append(array)
        return ort.OrtValue.ortvalue_from_numpy(array)

    def _bind(self, session: ort.InferenceSession, feed: ort.OrtValue) -> tuple[ort.IOBinding, list[ort.OrtValue]]:
        shapes = session.run(None, {session.get_inputs()[0].name: feed.numpy()})
        binding = session.io_binding()
        binding.bind_ortvalue_input(session.get_inputs()[0].name, feed)
        outputs = [self._value(np.empty_like(a)) for a in shapes]
        for meta, value in zip(session.get_outputs(), outputs, strict=True):
            binding.bind_ortvalue_output(meta.name, value)
        return binding, outputs

    def run_stage(self, k: int) -> None:
        self.stages[k].run_with_iobinding(self.stage_bindings[k])

    def run_full(self) -> None:
        self.full.run_with_iobinding(self.full_binding)


class PlainGraphs(TimedGraphs):
    """The same timings through `session.run` with numpy in and out, as the simplest client runs them."""

    def __init__(self, stages: Sequence[ort.InferenceSession], full: ort.InferenceSession, x: np.ndarray) -> None:
        self.stages, self.full, self.x = list(stages), full, x
        self.names = [s.get_inputs()[0].name for s in self.stages]
        self.h = x  # the input of the next stage to run

    def run_stage(self, k: int) -> None:
        self.h = self.stages[k].run(None, {self.names[k]: self.x if k == 0 else self.h})[0]

    def run_full(self) -> None:
        self.full.run(None, {self.names[0]: self.x})


def measure(
    stage_files: Sequence[Path],
    full_file: Path,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 8, 64),
    runs: int = 2000,
    progress: bool = True,
    plain: bool = False,
) -> list[StageLatency]:
    """Median latency of each stage, of the chain and of the full graph at each batch size.

    Batch 1 gets `runs` timed runs; larger batches proportionally fewer (at least 50), each after
    a tenth as many warm-up runs. `plain` times `session.run` instead of bound buffers.
    """
    stages = [load_session(f, INTRA_OP_THREADS) for f in stage_files]
    full = load_session(full_file, INTRA_OP_THREADS)
    counts = {b: max(50, runs // b) for b in batch_sizes}
    rng = np.random.default_rng(0)
    bar = tqdm(total=sum(c + c // 10 for c in counts.values()), desc="latency", unit="run", disable=not progress)
    rows = []
    for batch in batch_sizes:
        x = rng.standard_normal((batch, *input_shape)).astype(np.float32)
        graphs = (PlainGraphs if plain else BoundGraphs)(stages, full, x)
        stage_ns: list[list[int]] = [[] for _ in stages]
        full_ns = []
        warmup = counts[batch] // 10
        for i in range(warmup + counts[batch]):
            if i % 2:
                full_time, times = graphs.time_full(), graphs.time_chain()
            else:
                times, full_time = graphs.time_chain(), graphs.time_full()
            if i >= warmup:
                for k, t in enumerate(times):
                    stage_ns[k].append(t)
                full_ns.append(full_time)
            bar.update(1)
        rows.append(
            StageLatency(
                batch_size=batch,
                stage_ms=[_median_ms(s) for s in stage_ns],
                chain_ms=_median_ms([sum(t) for t in zip(*stage_ns, strict=True)]),
                full_graph_ms=_median_ms(full_ns),
                runs=counts[batch],
            )
        )
    bar.close()
    return rows


def cost_profile(
    stage_files: Sequence[Path],
    full_file: Path,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 8, 64),
    runs: int = 2000,
    progress: bool = True,
) -> CostProfile:
    if 1 not in batch_sizes:
        raise ValueError("batch size 1 must be measured: expected latencies of operating points use it")
    load_before = os.getloadavg()
    latency = measure(stage_files, full_file, input_shape, batch_sizes, runs, progress)
    load_after = os.getloadavg()
    return CostProfile(
        host=describe_host(),
        cpu_count=os.cpu_count() or 1,
        onnxruntime=ort.__version__,
        intra_op_threads=INTRA_OP_THREADS,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        load_average=tuple(max(a, b) for a, b in zip(load_before, load_after, strict=True)),
        latency=latency,
    )
