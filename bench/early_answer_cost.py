"""What an early answer costs against the shipped model's full graph, side by side in one process.

    python bench/early_answer_cost.py models/fmnist-resnet/4 --against models/fmnist-resnet/3 --repeats 5
    python bench/early_answer_cost.py --layouts --against models/fmnist-resnet/3 --repeats 5   # needs torch

Each repeat times, at batch 1 and in one loop, a candidate's chain of stage graphs (bound buffers
on onnxruntime's C binding, as `calibrate` times them) and the reference's full graph, taking turns
in blocks of runs (`branchserve.repo.profiling.measure`). A stage's figure is what it adds to the
median time to reach its exit. For a version, the expected latency of its default point is
Σ f_k · (time to reach exit k) with f its exit fractions on test (and on validation), reported over
the reference's full graph; the ratio is the median over repeats.

`--layouts` exports untrained models of several exit layouts (a CNN's cost does not depend on its
weights) and reports the time to reach each exit over the reference's full graph: the cost side of
the exit-placement, head and width study.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from branchserve.repo.frontier import expected_cost
from branchserve.repo.loading import load_version
from branchserve.repo.profiling import describe_host, measure

W32 = (32, 32, 48, 48, 96, 96, 96, 96)
LAYOUTS: dict[str, dict[str, object]] = {
    "v3: w32, exits 1,3,5,7": {"widths": W32, "exits": (1, 3, 5, 7)},
    "w32, exits 0,1,3,5,7": {"widths": W32, "exits": (0, 1, 3, 5, 7)},
    "w32, exits 0,1,2,3,5,7": {"widths": W32, "exits": (0, 1, 2, 3, 5, 7)},
    "w32, exits 0,1,3,5,7, heads without 1×1 conv": {"widths": W32, "exits": (0, 1, 3, 5, 7), "head_conv_width": 0},
    "w32, 6 exits equidistant by MACs (0,1,3,4,6,7), no 1×1 conv": {
        "widths": W32,
        "exits": (0, 1, 3, 4, 6, 7),
        "head_conv_width": 0,
    },
    "w32, 8 exits (every block), no 1×1 conv": {"widths": W32, "exits": tuple(range(8)), "head_conv_width": 0},
    "w16 stage 0, exits 0,1,3,5,7": {"widths": (16, 16, *W32[2:]), "exits": (0, 1, 3, 5, 7)},
    "w16 stage 0, exits 1,3,5,7": {"widths": (16, 16, *W32[2:]), "exits": (1, 3, 5, 7)},
    "w16 stage 0, exits 0,1,3,5,7, no 1×1 conv": {
        "widths": (16, 16, *W32[2:]),
        "exits": (0, 1, 3, 5, 7),
        "head_conv_width": 0,
    },
    "w16 stage 0, 64/128 after, exits 0,1,3,5,7, no 1×1 conv": {
        "widths": (16, 16, 64, 64, 128, 128, 128, 128),
        "exits": (0, 1, 3, 5, 7),
        "head_conv_width": 0,
    },
}


def reach_ms(stage_ms: list[float]) -> list[float]:
    return np.cumsum(stage_ms).tolist()


def time_version(version_dir: Path, reference: Path, repeats: int, runs: int) -> None:
    m, ref = load_version(version_dir), load_version(reference)
    point = m.operating_point(m.default_operating_point)
    stages = [version_dir / s.file for s in m.stages]
    ratios: dict[str, list[float]] = {"test": [], "val": []}
    for r in range(repeats):
        row = measure(stages, reference / ref.full_graph.file, m.input.shape, (1,), runs, False)[0]
        for split, fractions in (("test", point.test_exit_fractions), ("val", point.exit_fractions)):
            ratios[split].append(expected_cost(fractions, row.stage_ms) / row.full_graph_ms)
        reach = " / ".join(f"{ms:.3f}" for ms in reach_ms(row.stage_ms))
        print(
            f"repeat {r}: reach exits {reach} ms; {ref.name}/{ref.version} full graph {row.full_graph_ms:.3f} ms; "
            f"default point {ratios['test'][-1]:.3f}× (test fractions), {ratios['val'][-1]:.3f}× (validation)"
        )
    for split, values in ratios.items():
        print(
            f"{m.name}/{m.version} `{point.name}` ({split} exit fractions "
            f"{'/'.join(f'{100 * f:.0f}' for f in (point.test_exit_fractions if split == 'test' else point.exit_fractions))}"
            f" %): median {np.median(values):.3f}× {ref.name}/{ref.version}'s full graph "
            f"(min {min(values):.3f}, max {max(values):.3f}) over {repeats} repeats of {runs} runs"
        )
    print(
        f"test accuracy {100 * point.test_accuracy:.2f} % against {ref.name}/{ref.version}'s final exit "
        f"{100 * ref.exits[-1].test_accuracy:.2f} %"
    )


def export_layouts(folder: Path) -> dict[str, list[Path]]:
    """One untrained export per layout: its stage graph files."""
    import torch

    from branchserve.training.config import ArchConfig
    from branchserve.training.data import FMNIST_INPUT
    from branchserve.training.export.graphs import stage_file, write_graphs
    from branchserve.training.model import BranchedNet, stage_macs

    files = {}
    for i, (name, layout) in enumerate(LAYOUTS.items()):
        torch.manual_seed(0)
        widths = layout["widths"]
        arch = ArchConfig(exits=layout["exits"], head_conv_width=layout.get("head_conv_width", 48))  # type: ignore[arg-type]
        model = BranchedNet(arch.with_widths(widths)).eval()  # type: ignore[arg-type]
        out = folder / str(i)
        out.mkdir()
        write_graphs(model, FMNIST_INPUT, out)  # it folds the heads itself
        files[name] = [out / stage_file(k) for k in range(len(model.heads))]
        macs = np.cumsum([s["backbone_macs"] + s["head_macs"] for s in stage_macs(model)]) / 1e6
        print(f"{name}: MMACs to reach each exit {' / '.join(f'{m:.2f}' for m in macs)}")
    return files


def time_layouts(reference: Path, repeats: int, runs: int) -> None:
    ref = load_version(reference)
    with tempfile.TemporaryDirectory() as tmp:
        layouts = export_layouts(Path(tmp))
        reaches: dict[str, list[list[float]]] = {name: [] for name in layouts}
        for _ in range(repeats):
            for name, stages in layouts.items():
                row = measure(stages, reference / ref.full_graph.file, ref.input.shape, (1,), runs, False)[0]
                reaches[name].append([ms / row.full_graph_ms for ms in reach_ms(row.stage_ms)])
    print(f"time to reach each exit over {ref.name}/{ref.version}'s full graph, batch 1, median of {repeats}:")
    print("| layout | × full graph to reach exit 0 / 1 / … |")
    print("|---|---|")
    for name, rows in reaches.items():
        print(f"| {name} | {' / '.join(f'{x:.3f}' for x in np.median(rows, axis=0))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version_dir", type=Path, nargs="?", help="candidate version (omit with --layouts)")
    parser.add_argument("--against", type=Path, default=Path("models/fmnist-resnet/3"), help="reference version")
    parser.add_argument("--layouts", action="store_true", help="time untrained exports of several exit layouts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=2000, help="timed runs per repeat, after a tenth as many warm-up")
    args = parser.parse_args()
    print(f"on {describe_host()}, load average {os.getloadavg()[0]:.2f}")
    if args.layouts:
        time_layouts(args.against, args.repeats, args.runs)
    elif args.version_dir:
        time_version(args.version_dir, args.against, args.repeats, args.runs)
    else:
        parser.error("give a version folder or --layouts")
    print(f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
