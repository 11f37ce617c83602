"""What splitting costs the server: its stage chain run to the end against the single full graph.

    python bench/staged_vs_full.py models/fmnist-resnet/3 --repeats 5 --runs 2000

Each repeat builds the server's own `ModelRuntime` (fresh sessions, one intra-op thread, no
spinning; calibrated as at start-up) and times, in one loop, taking turns in blocks of runs:

* graph calls: the stages through `ModelRuntime.stage_call`, the calls `run` makes (bound
  buffers at batch 1, the C binding with numpy out at larger batches), against the full graph
  called the same way (`repo/graphcalls.py`). This is also what `calibrate` records.
* served: `ModelRuntime.run` with no exit taken (every stage, its confidence, the bookkeeping)
  against the full graph plus what serving it would need once (its confidence; probabilities are
  computed only for answers that ask for them, by either).
* `session.run`: both through onnxruntime's Python wrapper with numpy in and out, as the server
  called its stages before (for comparison).

A ratio is median chain time over median full-graph time in one repeat; the figure is the median
over repeats. Needs no torch.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from branchserve.repo.confidence import exit_confidence
from branchserve.repo.graphcalls import BoundChain, graph_call
from branchserve.repo.loading import load_version
from branchserve.repo.manifest import Manifest
from branchserve.repo.profiling import PlainGraphs, describe_host
from branchserve.repo.sessions import load_session
from branchserve.server.runtime import ModelRuntime

BLOCK = 50


def timings(m: Manifest, version_dir: Path, x: np.ndarray) -> dict[str, Callable[[], object]]:
    runtime = ModelRuntime(m, version_dir)
    full_session = load_session(version_dir / m.full_graph.file)
    final = m.full_graph.logits_outputs[-1]
    if len(x) == 1:
        bound = BoundChain([full_session], x, [])

        def full() -> np.ndarray:
            np.copyto(bound.input, x)  # the request's input into the bound buffer, as `stage_call` does
            bound.calls[0]()
            return bound.outputs[0][final]
    else:
        names = [o.name for o in full_session.get_outputs()]
        call = graph_call(full_session, names)

        def full() -> np.ndarray:
            return call(m.input.name, x)[names.index(final)]

    def full_served() -> None:
        exit_confidence(full(), m.confidence)

    def stage_calls() -> None:
        call, h = runtime.stage_call(x), x
        for k in range(runtime.num_exits):
            _, boundary = call(k, h)
            if boundary is not None:
                h = boundary

    plain = PlainGraphs([s.session for s in runtime.stages], full_session, x)
    never, last = [2.0] * (runtime.num_exits - 1) + [0.0], runtime.num_exits - 1
    return {
        "graph calls, chain": stage_calls,
        "graph calls, full": full,
        "served, chain": lambda: runtime.run(x, never, last),
        "served, full": full_served,
        "session.run, chain": plain.time_chain,
        "session.run, full": plain.time_full,
    }


def repeat(m: Manifest, version_dir: Path, x: np.ndarray, runs: int) -> dict[str, float]:
    """Median µs of each timing over `runs`, after a tenth as many warm-up runs."""
    fns = timings(m, version_dir, x)
    samples: dict[str, list[int]] = {name: [] for name in fns}
    total = runs + runs // 10
    while len(samples["graph calls, full"]) < total:
        for name, fn in fns.items():
            for _ in range(BLOCK):
                t0 = time.perf_counter_ns()
                fn()
                samples[name].append(time.perf_counter_ns() - t0)
    return {name: float(np.median(s[runs // 10 :])) / 1e3 for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=2000, help="timed runs per repeat, after a tenth as many warm-up")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    m = load_version(args.version_dir)
    x = np.random.default_rng(0).standard_normal((args.batch_size, *m.input.shape)).astype(np.float32)
    print(f"{m.name}/{m.version} on {describe_host()}, batch {args.batch_size}, load average {os.getloadavg()}")
    ratios: dict[str, list[float]] = {"graph calls": [], "served": [], "session.run": []}
    for r in range(args.repeats):
        us = repeat(m, args.version_dir, x, args.runs)
        for how, rs in ratios.items():
            rs.append(us[f"{how}, chain"] / us[f"{how}, full"])
        print(f"repeat {r}: " + ", ".join(f"{name} {v:.1f} µs" for name, v in us.items()))
    for how, rs in ratios.items():
        print(
            f"{how}: chain / full median {np.median(rs):.3f} (min {min(rs):.3f}, max {max(rs):.3f}) "
            f"over {args.repeats} repeats of {args.runs} runs"
        )
    print(f"load average now {os.getloadavg()}")


if __name__ == "__main__":
    main()
