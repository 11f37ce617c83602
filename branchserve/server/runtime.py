"""The stage-by-stage engine: run stage k, score exit k, let confident samples leave, feed the rest on.

A request's inputs run as one batch that shrinks as samples leave, so nobody computes a stage
they don't need. Everything here is synchronous and thread-safe: the API runs small requests on
the event loop and the rest in worker threads.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import onnxruntime as ort

from branchserve.repo.blocked import load_stages
from branchserve.repo.confidence import confidence, exit_confidence, softmax
from branchserve.repo.graphcalls import BoundChain, graph_call
from branchserve.repo.manifest import Manifest, StageSpec
from branchserve.repo.tensors import Float64Array, FloatArray, IntArray

CALIBRATION_BATCH = 16
MEAN_STEP = 0.05  # EWMA weight of one observation in the mean slowdown
TAIL_QUANTILE = 0.98  # deadlines predict a stage's time by this quantile of its recent slowdowns
TAIL_STEP = 0.05
FINISH_SECONDS = 0.0001  # softmax, confidence and the response after the last stage that runs


class StageClock:
    """Predicts a stage's time for n rows: a line a + b·n fitted at start-up, scaled by live slowdowns.

    Each call's observed/fitted ratio updates two statistics per stage: the mean (an EWMA), which
    prices latency budgets, and a high quantile (stochastic quantile tracking), which deadlines use
    so that a stage predicted to fit almost always does, even on a busy host.
    """

    def __init__(self, fitted: Sequence[tuple[float, float]]) -> None:
        self.fitted = list(fitted)
        self.mean = [1.0] * len(fitted)
        self.tail = [1.5] * len(fitted)

    def _base(self, k: int, n: int) -> float:
        a, b = self.fitted[k]
        return a + b * n

    def observe(self, k: int, n: int, seconds: float) -> None:
        ratio = seconds / self._base(k, n)
        self.mean[k] += MEAN_STEP * (ratio - self.mean[k])
        step = TAIL_QUANTILE if ratio > self.tail[k] else TAIL_QUANTILE - 1.0
        self.tail[k] *= 1.0 + TAIL_STEP * step

    def idle_time(self, k: int, n: int) -> float:
        """Seconds stage k takes for n rows on an idle host: nothing answers sooner."""
        return self._base(k, n)

    def worst_case(self, k: int, n: int) -> float:
        """Seconds stage k will take for n rows, rarely exceeded."""
        return self.tail[k] * self._base(k, n) + FINISH_SECONDS

    def per_input_ms(self) -> list[float]:
        """Mean live latency of each stage for one input, in milliseconds."""
        return [self.mean[k] * self._base(k, 1) * 1e3 for k in range(len(self.fitted))]


@dataclass
class Outcome:
    """Per-input answers of one run, and what the run cost."""

    exits: IntArray  # (n,): exit that answered each input
    confidence: FloatArray  # (n,)
    logits: FloatArray  # (n, classes): of the exit that answered each input
    stage_seconds: list[float]  # wall time of each stage call
    scored: list[FloatArray | Float64Array]  # confidence of every row each stage call computed, answered there or not
    deadline_stopped: bool

    @property
    def classes(self) -> IntArray:
        """(n,): each input's class, its exit's top logit: the top probability's, except where two
        logits are so close that their probabilities round to the same float32."""
        top: IntArray = self.logits.argmax(axis=1)
        return top

    @functools.cached_property
    def probs(self) -> FloatArray:
        """(n, classes), computed when an answer asks for them (~4 µs at batch 1)."""
        return softmax(self.logits)


class Trace:
    """Every exit's confidence and class for a few rows of one run (those the exit-quality monitor
    sampled), and each row's last stage and boundary tensor, so it can be finished later."""

    def __init__(self, n: int, rows: Sequence[int], exits: int) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.position = np.full(n, -1, np.int64)
        self.position[self.rows] = np.arange(len(self.rows))
        self.confidence = np.full((exits, len(self.rows)), np.nan, np.float32)
        self.classes = np.full((exits, len(self.rows)), -1, np.int64)
        self.reached = np.zeros(len(self.rows), np.int64)
        self.boundary: dict[int, FloatArray] = {}  # traced position → boundary after its last stage

    def record(
        self,
        k: int,
        active: IntArray,
        conf: FloatArray | Float64Array,
        logits: FloatArray,
        boundary: FloatArray | None,
    ) -> None:
        where = self.position[active]
        hit = np.flatnonzero(where >= 0)
        if not len(hit):
            return
        rows = where[hit]
        self.confidence[k, rows], self.classes[k, rows], self.reached[rows] = conf[hit], logits[hit].argmax(1), k
        for row, i in zip(rows.tolist(), hit.tolist(), strict=True):
            if boundary is None:
                self.boundary.pop(row, None)
            else:
                self.boundary[row] = boundary[i].copy()  # a copy: the batch's tensor is not kept alive


StageFn = Callable[[FloatArray], tuple[FloatArray, FloatArray | None]]
"""One stage, wherever it runs: input (or boundary) rows → (exit logits, boundary or None after the last stage)."""


class Stage:
    """A stage in this process: its ONNX Runtime session, called through the C binding."""

    def __init__(self, spec: StageSpec, session: ort.InferenceSession) -> None:
        self.input_name = spec.input_name
        self.logits_output, self.boundary_output = spec.logits_output, spec.boundary_output
        self.session = session
        self._call = graph_call(
            session, [spec.logits_output] + ([spec.boundary_output] if spec.boundary_output else [])
        )

    def __call__(self, x: FloatArray) -> tuple[FloatArray, FloatArray | None]:
        """(exit logits, boundary tensor or None for the last stage)."""
        out = self._call(self.input_name, x)
        return out[0], (out[1] if len(out) > 1 else None)


StageCall = Callable[[int, FloatArray], tuple[FloatArray, FloatArray | None]]
"""Runs stage k on its input: (exit logits, boundary tensor or None after the last stage); at batch 1
they are buffers the thread's next run writes again."""


class _BoundStages:
    """Batch 1 through a `BoundChain`: stage k reads stage k − 1's boundary buffer in place, so the
    input it is given is ignored after stage 0. The buffers are reused by the thread's next run, so
    what outlives a run is copied out of them (`ModelRuntime._outcome`, `Trace.record`)."""

    def __init__(self, stages: Sequence[Stage], input_shape: Sequence[int]) -> None:
        feeds = [cast(str, s.boundary_output) for s in stages[:-1]]
        chain = BoundChain([s.session for s in stages], np.zeros((1, *input_shape), np.float32), feeds)
        self.input = chain.input
        self.steps = [
            (call, out[s.logits_output], None if s.boundary_output is None else out[s.boundary_output])
            for call, out, s in zip(chain.calls, chain.outputs, stages, strict=True)
        ]

    def start(self, x: FloatArray) -> StageCall:
        np.copyto(self.input, x)
        return self._step

    def _step(self, k: int, _: FloatArray) -> tuple[FloatArray, FloatArray | None]:
        call, logits, boundary = self.steps[k]
        call()
        return logits, boundary


class ModelRuntime:
    """One served model version: a session per stage and a clock calibrated on this host."""

    def __init__(
        self,
        manifest: Manifest,
        version_dir: Path,
        intra_op_threads: int = 1,
        remote: Sequence[StageFn] | None = None,
    ) -> None:
        """`remote`: the stages, when they run elsewhere (the Ray stages layout's deployments) instead of
        in this process's sessions."""
        self.manifest = manifest
        self._local_stages: list[Stage] | None = None
        if remote is None:
            sessions = load_stages(
                [version_dir / s.file for s in manifest.stages], manifest.input.shape, intra_op_threads
            )
            self._local_stages = [Stage(s, session) for s, session in zip(manifest.stages, sessions, strict=True)]
        self.stages: list[StageFn] = list(self._local_stages or remote or [])
        self.input_shape = manifest.input.shape
        stage_macs = [s.backbone_macs + s.head_macs for s in manifest.stages]
        self.cumulative_macs: IntArray = np.cumsum(stage_macs, dtype=np.int64)
        self._local = threading.local()  # each thread's bound buffers for batch 1
        self.clock = StageClock(self._calibrate())

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def stage_call(self, x: FloatArray) -> StageCall:
        """How this run calls its stages: batch 1 bound (this thread's buffers), larger batches on
        the C binding with numpy out (their rows shrink as inputs leave), remote stages as they are."""
        if len(x) != 1 or self._local_stages is None:
            return lambda k, h: self.stages[k](h)
        bound: _BoundStages | None = getattr(self._local, "bound", None)
        if bound is None:
            bound = self._local.bound = _BoundStages(self._local_stages, self.input_shape)
        return bound.start(x)

    def _calibrate(self, repeats: int = 20) -> list[tuple[float, float]]:
        """Time every stage at batch 1 and CALIBRATION_BATCH (medians) and fit a + b·n; also warms ORT up."""
        fitted = []
        xs = {n: np.zeros((n, *self.input_shape), np.float32) for n in (1, CALIBRATION_BATCH)}
        calls = {n: self.stage_call(x) for n, x in xs.items()}
        for k in range(len(self.stages)):
            medians = {}
            for n, x in xs.items():
                times = []
                for _ in range(repeats if n == 1 else repeats // 4 + 1):
                    t0 = time.perf_counter()
                    _, boundary = calls[n](k, x)
                    times.append(time.perf_counter() - t0)
                medians[n] = float(np.median(times))
                if boundary is not None:  # None after the last stage, whose output feeds nothing
                    xs[n] = boundary
            b = max((medians[CALIBRATION_BATCH] - medians[1]) / (CALIBRATION_BATCH - 1), 0.0)
            fitted.append((max(medians[1] - b, 1e-6), b))
        return fitted

    def _would_overrun(self, k: int, rows: int, deadline_at: float) -> bool:
        return time.perf_counter() + self.clock.worst_case(k, rows) > deadline_at

    def run(
        self,
        x: FloatArray,
        thresholds: Sequence[float],
        max_exit: int,
        deadline_at: float | None = None,
        trace: Trace | None = None,
    ) -> Outcome:
        """Run (n, C, H, W) inputs; `deadline_at` is a time.perf_counter() instant; `trace` keeps what the
        exit-quality monitor needs of the rows it sampled.

        Only confidences are computed per stage (for max-softmax, 1/Σexp(z − max), without the
        full softmax); inputs are written to the answer when they leave, and probabilities only if
        an answer asks for them (`Outcome.probs`). At batch 1 that is a handful of numpy calls per
        stage instead of a dozen.
        """
        rows = np.arange(len(x))  # the inputs still running
        answered: list[tuple[int, IntArray, FloatArray | Float64Array, FloatArray]] = []  # exit, rows, conf, logits
        seconds: list[float] = []
        scored: list[FloatArray | Float64Array] = []
        stopped = False
        h, ran, call = x, 0, self.stage_call(x)
        for k in range(len(self.stages)):
            if k and deadline_at is not None and self._would_overrun(k, len(rows), deadline_at):
                stopped = True
                break
            t0 = time.perf_counter()
            logits, boundary = call(k, h)
            dt = time.perf_counter() - t0
            self.clock.observe(k, len(rows), dt)
            c = exit_confidence(logits, self.manifest.confidence)
            seconds.append(dt)
            scored.append(c)
            ran = k
            if trace is not None:
                trace.record(k, rows, c, logits, boundary)
            if k >= max_exit or boundary is None:
                break
            stay = c < thresholds[k]
            staying = np.count_nonzero(stay)  # one call, where all() and any() were two
            if staying == len(rows):
                h = boundary
                continue
            if not staying:
                break
            leave = ~stay
            answered.append((k, rows[leave], c[leave], logits[leave]))
            # The rest answer from this exit if a later stage is cut, so keep its scores for them.
            rows, h, c, logits = rows[stay], boundary[stay], c[stay], logits[stay]
        answered.append((ran, rows, c, logits))
        return self._outcome(len(x), answered, seconds, scored, stopped)

    def _outcome(
        self,
        n: int,
        answered: list[tuple[int, IntArray, FloatArray | Float64Array, FloatArray]],
        seconds: list[float],
        scored: list[FloatArray | Float64Array],
        stopped: bool,
    ) -> Outcome:
        if len(answered) == 1:  # everyone answered at one exit, in input order (always so at batch 1)
            k, _, conf, logits = answered[0]
            exits: IntArray = np.full(n, k, np.int64)
            logits = logits.copy()  # at batch 1, a buffer the next run writes
        else:
            exits = np.zeros(n, np.int64)
            conf = np.zeros(n, np.float32)
            logits = np.zeros((n, len(self.manifest.labels)), np.float32)
            for k, rows, c, z in answered:
                exits[rows], conf[rows], logits[rows] = k, c, z
        return Outcome(exits, conf.astype(np.float32, copy=False), logits, seconds, scored, stopped)

    def finish(self, k: int, h: FloatArray) -> tuple[list[FloatArray], list[FloatArray]]:
        """Run stages k.. on boundary tensor `h` (of stage k − 1) to the last exit, off the request path:
        the confidence and probabilities of each exit reached; the live clock is left alone."""
        confidences, probabilities = [], []
        for stage in self.stages[k:]:
            logits, boundary = stage(h)
            p = softmax(logits)
            confidences.append(confidence(p, self.manifest.confidence).astype(np.float32))
            probabilities.append(p)
            if boundary is not None:
                h = boundary
        return confidences, probabilities
