"""A generated image folder where colour decides the class: coloured shapes on textured backgrounds.

Classes are colour × shape ("red-circle", "green-square", ...). The colours have the same grey
level (PIL's luma, which `convert("L")` uses), so a grey model can tell the shape but not the
colour: only a model that sees colour can tell every class apart. Images come in several sizes
and aspect ratios, as a user's photos would, for the resize policies to matter.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 63, 63), "green": (39, 160, 39), "blue": (91, 91, 255)}
"""Luma 299·R + 587·G + 114·B over 1000 is 110 ± 0.3 for each: the same grey."""
SHAPES = ("circle", "square")
SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}


def class_names(colours: Sequence[str] = tuple(COLOURS), shapes: Sequence[str] = SHAPES) -> list[str]:
    return [f"{c}-{s}" for c in colours for s in shapes]


def draw(rng: np.random.Generator, name: str, size: tuple[int, int]) -> Image.Image:
    """One image of class `name` (colour-shape): a striped, noisy background in random colours, the
    shape in the class colour (± 8 per channel) at a random place and scale."""
    colour, shape = name.split("-")
    w, h = size
    stripes = rng.integers(0, 256, (2, 3))
    period = rng.integers(3, 9)
    across = (np.arange(w)[None, :] + rng.integers(0, 2) * np.arange(h)[:, None]) // period % 2
    background = stripes[across] + rng.integers(-20, 21, (h, w, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    side = min(w, h)
    r = rng.uniform(0.22, 0.38) * side
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    fill = tuple(int(np.clip(v + rng.integers(-8, 9), 0, 255)) for v in COLOURS[colour])
    box = (cx - r, cy - r, cx + r, cy + r)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    else:
        pen.rectangle(box, fill=fill)
    return image


def write_folder(
    root: Path,
    per_class: int,
    sizes: Sequence[tuple[int, int]] = ((32, 32),),
    seed: int = 0,
    split_folders: bool = False,
    classes: Sequence[str] | None = None,
) -> list[str]:
    """`per_class` images of every class into `root/<class>/` (or `root/{train,val,test}/<class>/`
    when `split_folders`), as PNG, every tenth as JPEG; sizes drawn from `sizes`. Returns the classes."""
    rng = np.random.default_rng(seed)
    names = list(classes or class_names())
    for name in names:
        for i in range(per_class):
            split = _split_of(i, per_class) if split_folders else ""
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            size = sizes[rng.integers(len(sizes))]
            image = draw(rng, name, size)
            if i % 10 == 9:
                image.save(folder / f"{i:06d}.jpg", quality=95)
            else:
                image.save(folder / f"{i:06d}.png", compress_level=1)
    return names


def _split_of(i: int, n: int) -> str:
    train_end, val_end = round(n * SPLITS["train"]), round(n * (SPLITS["train"] + SPLITS["val"]))
    return "train" if i < train_end else "val" if i < val_end else "test"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder to write (one sub-folder per class)")
    p.add_argument("--per-class", type=int, default=500, help="images per class (default 500)")
    p.add_argument("--size", type=int, nargs="+", default=[32], help="image sizes to draw from, square (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--split-folders", action="store_true", help="write train/, val/ and test/ (default off)")
    args = p.parse_args()
    names = write_folder(args.out, args.per_class, [(s, s) for s in args.size], args.seed, args.split_folders)
    print(f"wrote {args.per_class} images of each of {len(names)} classes to {args.out}")


if __name__ == "__main__":
    main()
