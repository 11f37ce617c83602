"""Measure what each stage of a version costs on this host, and the full graph beside them.

Latency is measured with the sessions the server uses (one intra-op thread, no spinning), on
random inputs: a CNN's cost does not depend on pixel values, so re-measuring on another machine
needs neither torch nor the dataset. The chain and the full graph are timed in the same loop, in
alternating blocks of `BLOCK` runs, so a busy neighbour slows both alike while each is measured
warm, as a server running the same graphs request after request sees them. (Alternating every
run made each graph start with the other's weights evicted from L2: both ran ~10 % slower and the
chain lost more: 1.058 against 1.051 times the full graph in one process, fmnist-resnet/2.)

Stages are loaded as the server loads them (`repo/blocked.py`: boundaries in onnxruntime's blocked
layout) and timed through the calls the server makes (`repo/graphcalls.py`): bound to buffers
allocated once at batch 1 (`BoundGraphs`), onnxruntime's C binding with numpy out at larger
batches (`CalledGraphs`). A plain `session.run` (`PlainGraphs`, for comparison) adds the
wrapper's checks and allocates its outputs on every call: the shipped four-stage chain is ~1.055×
the full graph that way against ~1.025× bound (bench/staged_vs_full.py shows both).
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

from branchserve.repo.blocked import load_stages
from branchserve.repo.graphcalls import BoundChain, chain_feeds, graph_call
from branchserve.repo.manifest import CostProfile, StageLatency
from branchserve.repo.sessions import RUN_OPTIONS, load_session
from branchserve.repo.tensors import Float64Array, FloatArray

INTRA_OP_THREADS = 1
BLOCK = 50


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


def _median_ms(samples: Sequence[int]) -> float:
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
    batch, as the server runs batch 1. Not thread-safe: one per thread."""

    def __init__(self, stages: Sequence[ort.InferenceSession], full: ort.InferenceSession, x: FloatArray) -> None:
        self.stages = list(stages)
        self.chain = BoundChain(self.stages, x, chain_feeds(self.stages))
        self.full = BoundChain([full], x, [])

    def run_stage(self, k: int) -> None:
        self.chain.calls[k]()

    def run_full(self) -> None:
        self.full.calls[0]()


class CalledGraphs(TimedGraphs):
    """The same timings through the C binding with numpy in and out, as the server runs a batch."""

    def __init__(self, stages: Sequence[ort.InferenceSession], full: ort.InferenceSession, x: FloatArray) -> None:
        self.stages, self.x, self.h = list(stages), x, x
        self.names = [s.get_inputs()[0].name for s in self.stages]
        self.calls = [graph_call(s, [o.name for o in s.get_outputs()]) for s in [*self.stages, full]]

    def run_stage(self, k: int) -> None:
        self.h = self.calls[k](self.names[k], self.x if k == 0 else self.h)[0]

    def run_full(self) -> None:
        self.calls[-1](self.names[0], self.x)


class PlainGraphs(TimedGraphs):
    """The same timings through `session.run` with numpy in and out, as the simplest client runs them."""

    def __init__(self, stages: Sequence[ort.InferenceSession], full: ort.InferenceSession, x: FloatArray) -> None:
        self.stages, self.full, self.x = list(stages), full, x
        self.names: list[str] = [s.get_inputs()[0].name for s in self.stages]
        self.h = x  # the input of the next stage to run

    def run_stage(self, k: int) -> None:
        self.h = self.stages[k].run(None, {self.names[k]: self.x if k == 0 else self.h}, RUN_OPTIONS)[0]

    def run_full(self) -> None:
        self.full.run(None, {self.names[0]: self.x}, RUN_OPTIONS)


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
    a tenth as many warm-up runs; chain and full graph take turns in blocks of `BLOCK` runs at
    batch 1 (fewer at larger batches). Graphs run as the server runs them (bound at batch 1, the C
    binding at larger batches); `plain` times `session.run` instead.

    A stage's figure is what it adds to the median time to reach its exit (the median of the
    chain's running totals), so the stages add up to the chain's median and price operating points
    on the same footing as the chain. Each stage's own median would undercount: stage times are
    skewed to the right, and their medians summed to 0.787 ms against a chain median of 0.816 ms
    on the shipped model.
    """
    stages = load_stages(stage_files, input_shape, INTRA_OP_THREADS)
    full = load_session(full_file, INTRA_OP_THREADS)
    counts = {b: max(50, runs // b) for b in batch_sizes}
    rng = np.random.default_rng(0)
    bar = tqdm(total=sum(c + c // 10 for c in counts.values()), desc="latency", unit="run", disable=not progress)
    rows = []
    for batch in batch_sizes:
        x = rng.standard_normal((batch, *input_shape)).astype(np.float32)
        graphs = (PlainGraphs if plain else BoundGraphs if batch == 1 else CalledGraphs)(stages, full, x)
        chain_ns: list[list[int]] = []
        full_ns: list[int] = []
        warmup, total = counts[batch] // 10, counts[batch] + counts[batch] // 10
        block = max(5, BLOCK // batch)  # blocks of similar duration at every batch size
        while len(full_ns) < total:
            n = min(block, total - len(full_ns))
            chain_ns += [graphs.time_chain() for _ in range(n)]
            full_ns += [graphs.time_full() for _ in range(n)]
            bar.update(n)
        reach_ms: Float64Array = np.median(np.cumsum(chain_ns[warmup:], axis=1), axis=0) / 1e6
        rows.append(
            StageLatency(
                batch_size=batch,
                stage_ms=[float(ms) for ms in np.diff(reach_ms, prepend=0.0)],
                chain_ms=float(reach_ms[-1]),
                full_graph_ms=_median_ms(full_ns[warmup:]),
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
    one, five, fifteen = (max(a, b) for a, b in zip(load_before, load_after, strict=True))
    return CostProfile(
        host=describe_host(),
        cpu_count=os.cpu_count() or 1,
        onnxruntime=ort.__version__,
        intra_op_threads=INTRA_OP_THREADS,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        load_average=(one, five, fifteen),
        latency=latency,
    )
