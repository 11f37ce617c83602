"""The stage-by-stage engine: run stage k, score exit k, let confident samples leave, feed the rest on.

A request's inputs run as one batch that shrinks as samples leave, so nobody computes a stage
they don't need. Everything here is synchronous and thread-safe: the API runs small requests on
the event loop and the rest in worker threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import onnxruntime as ort

from branchserve.repo.confidence import confidence, softmax
from branchserve.repo.manifest import Manifest, StageSpec
from branchserve.repo.sessions import RUN_OPTIONS, load_session
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
    probs: FloatArray  # (n, classes)
    logits: FloatArray  # (n, classes): of the exit that answered each input
    stage_seconds: list[float]  # wall time of each stage call
    scored: list[FloatArray | Float64Array]  # confidence of every row each stage call computed, answered there or not
    deadline_stopped: bool


StageCall = Callable[[FloatArray], tuple[FloatArray, FloatArray | None]]
"""A stage as the runtime calls it: input (or boundary) rows → (exit logits, boundary or None)."""


class Stage:
    def __init__(self, spec: StageSpec, session: ort.InferenceSession) -> None:
        self.input_name = spec.input_name
        self.outputs = (
            [spec.logits_output] if spec.boundary_output is None else [spec.logits_output, spec.boundary_output]
        )
        self.session = session

    def __call__(self, x: FloatArray) -> tuple[FloatArray, FloatArray | None]:
        """(exit logits, boundary tensor or None for the last stage)."""
        out = cast(list[FloatArray], self.session.run(self.outputs, {self.input_name: x}, RUN_OPTIONS))
        return out[0], (out[1] if len(out) > 1 else None)


class ModelRuntime:
    """One served model version: a session per stage and a clock calibrated on this host."""

    def __init__(
        self,
        manifest: Manifest,
        version_dir: Path,
        intra_op_threads: int = 1,
        stages: Sequence[StageCall] | None = None,
    ) -> None:
        """`stages`: where the stages run when not in this process's sessions (the Ray stages layout's deployments)."""
        self.manifest = manifest
        self.stages: list[StageCall] = (
            [Stage(s, load_session(version_dir / s.file, intra_op_threads)) for s in manifest.stages]
            if stages is None
            else list(stages)
        )
        self.input_shape = manifest.input.shape
        stage_macs = [s.backbone_macs + s.head_macs for s in manifest.stages]
        self.cumulative_macs: IntArray = np.cumsum(stage_macs, dtype=np.int64)
        self.clock = StageClock(self._calibrate())

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def _calibrate(self, repeats: int = 20) -> list[tuple[float, float]]:
        """Time every stage at batch 1 and CALIBRATION_BATCH (medians) and fit a + b·n; also warms ORT up."""
        fitted = []
        xs = {n: np.zeros((n, *self.input_shape), np.float32) for n in (1, CALIBRATION_BATCH)}
        for stage in self.stages:
            medians = {}
            for n, x in xs.items():
                times = []
                for _ in range(repeats if n == 1 else repeats // 4 + 1):
                    t0 = time.perf_counter()
                    _, boundary = stage(x)
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
        self, x: FloatArray, thresholds: Sequence[float], max_exit: int, deadline_at: float | None = None
    ) -> Outcome:
        """Run (n, C, H, W) inputs; `deadline_at` is a time.perf_counter() instant."""
        n = len(x)
        exits = np.zeros(n, np.int64)
        conf = np.zeros(n, np.float32)
        probs = np.zeros((n, len(self.manifest.labels)), np.float32)
        answered_logits = np.zeros_like(probs)
        active = np.arange(n)
        seconds: list[float] = []
        scored: list[FloatArray | Float64Array] = []
        stopped = False
        h = x
        for k, stage in enumerate(self.stages):
            if k and deadline_at is not None and self._would_overrun(k, len(active), deadline_at):
                stopped = True
                break
            t0 = time.perf_counter()
            logits, boundary = stage(h)
            dt = time.perf_counter() - t0
            self.clock.observe(k, len(active), dt)
            p = softmax(logits)
            c = confidence(p, self.manifest.confidence)
            seconds.append(dt)
            scored.append(c)
            # Every sample still here answers from its deepest exit so far, in case a later stage is cut.
            exits[active], conf[active], probs[active], answered_logits[active] = k, c, p, logits
            if k >= max_exit or boundary is None:
                break
            stay = c < thresholds[k]
            if not stay.any():
                break
            active, h = active[stay], boundary[stay]
        return Outcome(exits, conf, probs, answered_logits, seconds, scored, stopped)
