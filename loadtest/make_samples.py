"""Write the load-test samples: the first N Fashion-MNIST test images as PNGs plus their labels.

    python -m loadtest.make_samples            # -> loadtest/samples/0000.png ... and labels.txt

Real test images (never seen in training or calibration), so the answers' accuracy under load can
be checked against the labels. PNG bytes are what clients upload; the JSON users decode them.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image

from training.data import read_idx

SAMPLES_DIR = Path(__file__).parent / "samples"
LABELS_FILE = "labels.txt"
DEFAULT_DATASET = Path("/usr/share/datasets/fashion-mnist")


def write_samples(dataset: Path, out: Path, count: int) -> None:
    images = read_idx(dataset / "t10k-images-idx3-ubyte.gz")[:count]
    labels = read_idx(dataset / "t10k-labels-idx1-ubyte.gz")[:count]
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    for i, image in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", optimize=True)
        (out / f"{i:04d}.png").write_bytes(buf.getvalue())
    (out / LABELS_FILE).write_text("".join(f"{int(label)}\n" for label in labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="folder with the idx.gz files")
    parser.add_argument("--out", type=Path, default=SAMPLES_DIR)
    parser.add_argument("--count", type=int, default=500, help="500 images: one image is 0.2 pp of accuracy")
    args = parser.parse_args()
    write_samples(args.dataset, args.out, args.count)
    print(f"wrote {args.count} images and {LABELS_FILE} to {args.out}")


if __name__ == "__main__":
    main()
