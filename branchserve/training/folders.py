"""A folder of images as a dataset that streams: files are listed and split up front, and decoded
batch by batch in DataLoader worker processes; only the file list stays in memory.

Two layouts: one sub-folder per class (split here per class, by a seeded permutation, 80/10/10),
or `train/` and `val/` (and optionally `test/`), each with one sub-folder per class. Each image
becomes an input through `repo/imaging.py`, the server's own conversion; the input spec's size
and colour come from the flags or from the images, its per-channel statistics from training images.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from branchserve.fmnist import DataError
from branchserve.repo.imaging import ImageError, image_to_input, image_to_pixels, open_image
from branchserve.repo.manifest import InputSpec
from branchserve.training.config import MAX_AUTO_SIZE, BadImages, Color, DataSource
from branchserve.training.data import Dataset, Split, pixel_sums, provisional_spec, with_statistics

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
VAL_FOLDERS = ("val", "validation", "valid")
HELD_OUT = 0.1
"""Share of each class held out for validation and for test, when the folder is not split already."""
MIN_PER_SPLIT = 1
AUTO_HEADERS = 256
"""Images (a seeded sample of train) whose headers choose the size and colour left on automatic."""
STATS_IMAGES = 5000
"""Training images (a seeded sample, or all if fewer) the per-channel mean and std are measured on."""
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
SCORING_BYTES = 32 << 20


@dataclass
class Reader:
    """How files are read: in how many worker processes, and what an unreadable image does. It
    remembers the images it left out (`skipped`, path → reason), for the run's record."""

    workers: int = 0
    bad_images: BadImages = "skip"
    progress: bool = True
    skipped: dict[str, str] = field(default_factory=dict)

    def batches(
        self, files: _Files, chunks: list[list[int]], desc: str | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) per chunk of indices, in order; unreadable images are left out (or stop the run)."""
        loader = DataLoader(files, batch_sampler=chunks, num_workers=self.workers, collate_fn=_collate)
        bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not (self.progress and desc))
        for x, y, bad in bar:
            for path, reason in bad:
                self.unreadable(path, reason)
            if len(y):
                yield x, y

    def unreadable(self, path: str, reason: str) -> None:
        if self.bad_images == "fail":
            raise DataError(f"{path}: {reason} (--bad-images skip leaves such images out and counts them)")
        if path not in self.skipped:
            self.skipped[path] = reason
            tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)


class _Files(TorchDataset):
    """Paths (as one bytes array: no per-file Python objects for forked workers to copy) and labels;
    an item is the converted image, or the reason it could not be read."""

    def __init__(self, paths: np.ndarray, labels: np.ndarray, spec: InputSpec, pixels: bool = False) -> None:
        self.paths, self.labels, self.spec, self.pixels = paths, labels, spec, pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, int, str, str | None]:
        path = os.fsdecode(self.paths[i])
        try:
            image = open_image(Path(path).read_bytes())
            array = image_to_pixels(image, self.spec) if self.pixels else image_to_input(image, self.spec)
        except ImageError as e:
            return None, int(self.labels[i]), path, str(e)
        except OSError as e:
            return None, int(self.labels[i]), path, f"cannot read it: {e.strerror or e}"
        return array, int(self.labels[i]), path, None


def _collate(
    items: list[tuple[np.ndarray | None, int, str, str | None]],
) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
    good = [(a, label) for a, label, _, error in items if error is None and a is not None]
    bad = [(path, error) for _, _, path, error in items if error is not None]
    x = torch.from_numpy(np.stack([a for a, _ in good])) if good else torch.empty(0)
    return x, torch.tensor([label for _, label in good], dtype=torch.int64), bad


class FolderSplit:
    """A split of a folder dataset: labels in memory, images decoded when a batch is asked for."""

    def __init__(self, paths: np.ndarray, labels: np.ndarray, spec: InputSpec, reader: Reader) -> None:
        self.paths, self.spec, self.reader = paths, spec, reader
        self.y = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.paths)

    def head(self, n: int | None) -> FolderSplit:
        return self if n is None else FolderSplit(self.paths[:n], self.y[:n].numpy(), self.spec, self.reader)

    def batches(
        self, batch_size: int, order: Tensor | None = None, desc: str | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches in `order` (training: exactly `batch_size`), or in stored order for scoring, where
        a batch holds at most SCORING_BYTES of inputs, so prefetching workers hold little at 224×224."""
        if order is None:
            batch_size = min(batch_size, max(1, SCORING_BYTES // (4 * int(np.prod(self.spec.shape)))))
        idx = np.arange(len(self)) if order is None else order.numpy()
        chunks = [idx[i : i + batch_size].tolist() for i in range(0, len(idx), batch_size)]
        return self.reader.batches(_Files(self.paths, self.y.numpy(), self.spec), chunks, desc)

    def loaded(self) -> Split:
        """Every image decoded into memory: for small subsets (the numerics check, probes)."""
        xs, ys = zip(*self.batches(256), strict=True) if len(self) else ((), ())
        return Split(torch.cat(xs), torch.cat(ys)) if xs else Split(torch.empty(0, *self.spec.shape), self.y[:0])


@dataclass
class Listing:
    """A folder's image files per split, as (path, label) in a seeded order, and what scanning saw."""

    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    layout: str
    ignored: int


def _class_files(folder: Path, bar: tqdm) -> tuple[dict[str, list[str]], int]:
    """Image files per class sub-folder of `folder`, sorted; and how many other entries were ignored."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; pass a folder with one sub-folder of images per class")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, ignored = {}, 0
    for name in classes:
        found = []
        with os.scandir(folder / name) as entries:
            for entry in entries:
                if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                    found.append(entry.path)
                else:
                    ignored += 1
        files[name] = sorted(found)
        bar.update(len(found))
    return files, ignored


def _hold_out(files: list[str], n_out: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    perm = rng.permutation(len(files))
    return [files[i] for i in perm[n_out:]], [files[i] for i in perm[:n_out]]


def scan(root: Path, split_seed: int, progress: bool = True) -> Listing:
    """List and split a folder: per class, so every class is in every split in proportion."""
    bar = tqdm(desc=f"scanning {root}", unit=" images", disable=not progress)
    rng = np.random.default_rng(split_seed)
    val_dir = next((root / v for v in VAL_FOLDERS if (root / v).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        layout = "train/val/test" if (root / "test").is_dir() else "train/val"
        per_split, ignored = {}, 0
        for split, folder in (("train", root / "train"), ("val", val_dir), ("test", root / "test")):
            if folder.is_dir():
                per_split[split], n = _class_files(folder, bar)
                ignored += n
        classes = list(per_split["train"])
        if "test" not in per_split:
            per_split["test"] = {}
            for name in classes:
                n_out = max(MIN_PER_SPLIT, round(len(per_split["train"][name]) * HELD_OUT))
                per_split["train"][name], per_split["test"][name] = _hold_out(per_split["train"][name], n_out, rng)
        for split in ("val", "test"):
            if extra := sorted(set(per_split[split]) - set(classes)):
                raise DataError(f"{root}: {split} has classes that train lacks: {', '.join(extra)}")
    else:
        layout = "class folders"
        files, ignored = _class_files(root, bar)
        classes = list(files)
        per_split = {"train": {}, "val": {}, "test": {}}
        for name, found in files.items():
            n_out = max(MIN_PER_SPLIT, round(len(found) * HELD_OUT))
            rest, per_split["test"][name] = _hold_out(found, n_out, rng)
            per_split["train"][name], per_split["val"][name] = _hold_out(rest, n_out, rng)
    bar.close()
    _check_classes(root, classes, per_split, layout)
    splits = {}
    for split, by_class in per_split.items():
        pairs = [(f, label) for label, name in enumerate(classes) for f in by_class.get(name, [])]
        splits[split] = [pairs[i] for i in rng.permutation(len(pairs))]
    return Listing(classes, splits, layout, ignored)


def _check_classes(root: Path, classes: list[str], per_split: dict[str, dict[str, list[str]]], layout: str) -> None:
    if len(classes) < 2:
        raise DataError(f"{root} has {len(classes)} class folders; need at least 2 (one sub-folder per class)")
    short = [
        f"{name} ({', '.join(f'{len(per_split[s].get(name, []))} {s}' for s in per_split)})"
        for name in classes
        if any(len(per_split[s].get(name, [])) < MIN_PER_SPLIT for s in per_split)
    ]
    if short:
        need = (
            "at least 3 images each (one for train, validation and test)"
            if layout == "class folders"
            else "an image in every split (and 2 in train/ when test/ is cut from it)"
        )
        raise DataError(f"{root}: too few images in class {'; '.join(short)}: classes need {need}")


def load_image_folder(
    source: DataSource, spec: InputSpec | None = None, workers: int = 0, progress: bool = True
) -> Dataset:
    """The folder `source` names, listed and split; `spec` (a trained run's) is used as it is,
    otherwise it is worked out from the images (see `input_spec`)."""
    source = source.model_copy(update={"path": source.path.resolve()})  # as the run records it
    listing = scan(source.path, source.split_seed, progress)
    reader = Reader(workers, source.bad_images, progress)
    arrays = {
        split: (np.array([os.fsencode(f) for f, _ in pairs]), np.array([label for _, label in pairs], np.int64))
        for split, pairs in listing.splits.items()
    }
    notes: dict[str, object] = {"layout": listing.layout, "ignored_files": listing.ignored}
    if spec is None:
        spec, notes["input_measured"] = input_spec(source, *arrays["train"], reader)
    notes["skipped"] = reader.skipped  # filled in as unreadable images are met, for the run's summary
    train, val, test = (FolderSplit(*arrays[s], spec, reader) for s in ("train", "val", "test"))
    return Dataset(source.path.name, listing.classes, spec, train, val, test, source, notes)


def input_spec(
    source: DataSource, paths: np.ndarray, labels: np.ndarray, reader: Reader
) -> tuple[InputSpec, dict[str, object]]:
    """Size and colour from the flags or, left on automatic, from a seeded sample of training
    images' headers (the median shorter side, at most 224; rgb if any is stored in colour); then
    each channel's mean and std, measured on up to STATS_IMAGES training images as they are converted."""
    rng = np.random.default_rng(source.split_seed)
    size, color, found = source.image_size, source.color, {}
    if size is None or color is None:
        size, color, found = _automatic(paths, rng, reader, size, color)
    spec = provisional_spec(size, color, source.resize)
    sample = np.sort(rng.choice(len(paths), min(STATS_IMAGES, len(paths)), replace=False))
    chunks = [sample[i : i + 256].tolist() for i in range(0, len(sample), 256)]
    total, squares, pixels, images = np.zeros(spec.shape[0], np.int64), np.zeros(spec.shape[0], np.int64), 0, 0
    for x, _ in reader.batches(_Files(paths, labels, spec, pixels=True), chunks, "input statistics"):
        t, s, n = pixel_sums(x.numpy())
        total, squares, pixels, images = total + t, squares + s, pixels + n, images + len(x)
    if not images:
        raise DataError(f"{source.path}: none of {len(sample)} training images could be read")
    return with_statistics(spec, total, squares, pixels), {**found, "statistics_images": images}


def _automatic(
    paths: np.ndarray, rng: np.random.Generator, reader: Reader, size: int | None, color: Color | None
) -> tuple[int, Color, dict[str, object]]:
    shapes = []
    for i in rng.choice(len(paths), min(AUTO_HEADERS, len(paths)), replace=False):
        path = os.fsdecode(paths[i])
        try:
            image = open_image(Path(path).read_bytes())
        except (ImageError, OSError) as e:
            reader.unreadable(path, str(e))
            continue
        shapes.append((min(image.size), image.mode))
    if not shapes:
        raise DataError(f"none of {min(AUTO_HEADERS, len(paths))} training images sampled could be read")
    size = size or int(np.clip(round(float(np.median([s for s, _ in shapes]))), 8, MAX_AUTO_SIZE))
    color = color or ("rgb" if any(mode not in GREY_MODES for _, mode in shapes) else "grey")
    return size, color, {"image_size": size, "color": color, "headers_read": len(shapes)}
