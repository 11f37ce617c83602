"""What streaming a large image folder costs: time to the first training batch and peak memory.

    python bench/folder_stream.py /tmp/shapes-100k --files 100000 --size 32 --workers 2 --repeats 3

Writes the folder first if it holds no images (coloured shapes, `branchserve.training.synthetic`,
one sub-folder per class), then measures in a fresh process, so its memory is the loader's own:
listing and splitting the files, measuring the per-channel statistics, and the first training
batch in a shuffled epoch order, as `branchserve train` reads them; then `--batches` more batches
for the decoding rate. Peak RSS (VmHWM) is read for the main process (and its RSS before loading:
the interpreter, torch and branchserve) and for each DataLoader worker while they run (a worker's
RSS counts the pages it shares with the main process). For scale, the float32 inputs of every
training image held in memory at once (as the folder dataset did before it streamed) are
computed, not allocated. Each repeat is a fresh process; the median of each figure is printed last.

    python bench/folder_stream.py /tmp/shapes-100k --corrupt 10

adds 10 corrupt files (a PNG signature, then noise) to the class folders and, in a fresh process,
reads one whole training epoch with `--bad-images skip` (images read, images skipped) and then
with `--bad-images fail` (how far it got, and the error).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from branchserve.fmnist import DataError
from branchserve.training.config import DataSource
from branchserve.training.sources import load_data
from branchserve.training.synthetic import class_names, write_folder


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM of a process, in MB (0 once it has gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024


def children() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024


def measure(args: argparse.Namespace) -> dict[str, object]:
    before = rss_mb()
    started = time.perf_counter()
    source = DataSource(kind="image-folder", path=args.folder, image_size=args.size, color="rgb")
    data = load_data(source, workers=args.workers)
    loaded = time.perf_counter()
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    batches = data.train.batches(args.batch_size, order)
    next(batches)
    first = time.perf_counter()
    workers: dict[int, float] = {}
    seen = 0
    for x, _ in batches:
        seen += len(x)
        workers.update({pid: max(workers.get(pid, 0.0), peak_rss_mb(pid)) for pid in children()})
        if seen >= args.batches * args.batch_size:
            break
    done = time.perf_counter()
    c, h, w = data.input.shape
    return {
        "files": sum(len(s) for s in (data.train, data.val, data.test)),
        "workers": args.workers,
        "batch_size": args.batch_size,
        "list_split_and_statistics_s": round(loaded - started, 2),
        "statistics_images": data.notes["input_measured"]["statistics_images"],
        "first_batch_s": round(first - started, 2),
        "decode_images_per_s": round(seen / (done - first)),
        "rss_before_loading_mb": round(before, 1),
        "peak_rss_main_mb": round(peak_rss_mb(), 1),
        "peak_rss_per_worker_mb": sorted(round(v, 1) for v in workers.values()),
        "all_inputs_in_memory_mb": round(len(data.train) * c * h * w * 4 / 2**20, 1),
        "load_average": os.getloadavg(),
    }


def write_corrupt(folder: Path, n: int) -> None:
    """n files that list as PNGs (their first bytes) and fail to decode, spread over the classes."""
    classes = sorted(d for d in folder.iterdir() if d.is_dir())
    noise = np.random.default_rng(0).bytes(2000)
    for k in range(n):
        (classes[k % len(classes)] / f"corrupt-{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + noise)


def read_epoch(args: argparse.Namespace, bad_images: str) -> dict[str, object]:
    """One training epoch of the folder, as `branchserve train --bad-images ...` reads it (statistics first)."""
    started = time.perf_counter()
    source = DataSource(kind="image-folder", path=args.folder, image_size=args.size, bad_images=bad_images)
    row: dict[str, object] = {"bad_images": bad_images}
    read, error = 0, None
    try:
        data = load_data(source, workers=args.workers, progress=False)
        row |= {"train_files": len(data.train), "corrupt_in_train": sum(b"corrupt-" in p for p in data.train.paths)}
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
        for x, _ in data.train.batches(args.batch_size, order):
            read += len(x)
        row["skipped"] = len(data.train.reader.skipped)
    except DataError as e:
        error = str(e)
    return row | {"images_read": read, "error": error, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="image folder (written first when it holds no class sub-folders)")
    p.add_argument("--files", type=int, default=100_000, help="images to write, spread over the classes")
    p.add_argument("--size", type=int, default=32, help="image and input size")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=100, help="batches after the first, for the decoding rate")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes to measure in")
    p.add_argument(
        "--corrupt", type=int, default=0, help="add this many corrupt files and read an epoch with each --bad-images"
    )
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the fresh process
    args = p.parse_args()
    if args.measure:
        rows = [read_epoch(args, bad) for bad in ("skip", "fail")] if args.corrupt else [measure(args)]
        print("\n".join(json.dumps(r) for r in rows))
        return
    if not args.folder.is_dir() or not any(args.folder.iterdir()):
        t = time.perf_counter()
        write_folder(args.folder, args.files // len(class_names()), sizes=((args.size, args.size),))
        print(f"wrote {args.files} images to {args.folder} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if args.corrupt:
        write_corrupt(args.folder, args.corrupt)
        print(
            subprocess.run([sys.executable, *sys.argv, "--measure"], check=True, capture_output=True, text=True).stdout
        )
        return
    rows = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, *sys.argv, "--measure"], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout))
        print(out.stdout.strip())
    numbers = [k for k, v in rows[0].items() if isinstance(v, int | float)]
    print(json.dumps({"median": {k: statistics.median(r[k] for r in rows) for k in numbers}}))


if __name__ == "__main__":
    main()
