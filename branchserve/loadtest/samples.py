"""The load-test samples: the first 500 Fashion-MNIST test images as PNGs, with their labels.

They ship in the package (`branchserve/loadtest/samples/`), so the load test, the container
check and the benches run on a serve-only install; rebuild them from the dataset with

    python -m branchserve.loadtest.samples            # -> samples/0000.png ... and labels.txt

Real test images (never seen in training or calibration), so the answers' accuracy under load can
be checked against the labels.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image

from branchserve.fmnist import fmnist_dir, read_split

SAMPLES_DIR = Path(__file__).parent / "samples"
LABELS_FILE = "labels.txt"


def sample_path(i: int, folder: Path = SAMPLES_DIR) -> Path:
    return folder / f"{i:04d}.png"


def sample_labels(folder: Path = SAMPLES_DIR) -> list[int]:
    return [int(line) for line in (folder / LABELS_FILE).read_text().split()]


def sample_pngs(folder: Path = SAMPLES_DIR) -> list[bytes]:
    """Every sample's PNG bytes, in label order."""
    return [sample_path(i, folder).read_bytes() for i in range(len(sample_labels(folder)))]


def write_samples(dataset: Path, out: Path, count: int) -> None:
    images, labels = read_split("test", dataset)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    for i, image in enumerate(images[:count]):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", optimize=True)
        sample_path(i, out).write_bytes(buf.getvalue())
    (out / LABELS_FILE).write_text("".join(f"{int(label)}\n" for label in labels[:count]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=fmnist_dir(), help="folder with the idx.gz files")
    parser.add_argument("--out", type=Path, default=SAMPLES_DIR)
    parser.add_argument("--count", type=int, default=500, help="500 images: one image is 0.2 pp of accuracy")
    args = parser.parse_args()
    write_samples(args.dataset, args.out, args.count)
    print(f"wrote {args.count} images and {LABELS_FILE} to {args.out}")


if __name__ == "__main__":
    main()
