"""What splitting costs: the chain of stage graphs run to the end against the single full graph.

    python bench/staged_vs_full.py models/fmnist-resnet/3 --repeats 11 --runs 2000

Each repeat opens fresh sessions (one intra-op thread, no spinning, as the server does) and times
chain and full graph in one loop at batch 1, taking turns in blocks of runs, twice: through
IOBindings into buffers allocated once, on onnxruntime's C binding (how `calibrate` measures), and
through plain `session.run` with numpy in and out.
The ratio reported is the median over repeats of median chain time over median full-graph time.
Needs no torch.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from branchserve.repo.loading import load_version
from branchserve.repo.profiling import describe_host, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=2000, help="timed runs per repeat, after a tenth as many warm-up")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    m = load_version(args.version_dir)
    files = [args.version_dir / s.file for s in m.stages]
    print(f"{m.name}/{m.version} on {describe_host()}, load average {os.getloadavg()[0]:.2f}")
    for plain in (False, True):
        how = "session.run, numpy in and out" if plain else "IOBinding, buffers allocated once"
        ratios = []
        for r in range(args.repeats):
            row = measure(
                files, args.version_dir / m.full_graph.file, m.input.shape, (args.batch_size,), args.runs, False, plain
            )[0]
            ratios.append(row.chain_ms / row.full_graph_ms)
            stages = " + ".join(f"{s:.3f}" for s in row.stage_ms)
            print(
                f"{how}, repeat {r}: chain {row.chain_ms:.3f} ms (stages {stages}), "
                f"full graph {row.full_graph_ms:.3f} ms, ratio {ratios[-1]:.3f}"
            )
        print(
            f"{how}: chain / full at batch {args.batch_size}: median {np.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f}) over {args.repeats} repeats of {args.runs} runs; "
            f"load average now {os.getloadavg()[0]:.2f}"
        )


if __name__ == "__main__":
    main()
