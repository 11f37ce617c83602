"""Folder datasets that stream: layouts, a seeded split per class, images decoded lazily in worker
processes exactly as the server converts an upload, the input spec from the data, and what an
unreadable image or a class with too few images does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from branchserve.cli import main
from branchserve.fmnist import DataError
from branchserve.repo.imaging import image_to_input, image_to_pixels, open_image
from branchserve.training.config import DataSource
from branchserve.training.data import Dataset
from branchserve.training.folders import FolderSplit
from branchserve.training.sources import load_data
from branchserve.training.synthetic import class_names, write_folder

SIZES = ((32, 32), (48, 40), (40, 56))
# Widths of 16: torch 2.13's CPU backward of a strided 1×1 convolution in channels-last memory
# crashes the process with fewer than 16 channels and an odd batch, which a skipped image makes.
TINY = ["--widths", "16,16,16,16,16,16,16,16", "--batch-size", "16", "--epochs", "1", "--schedule", "joint"]


def source(root: Path, **reading: object) -> DataSource:
    return DataSource.model_validate({"kind": "image-folder", "path": root, **reading})


def load(root: Path, workers: int = 0, **reading: object) -> Dataset:
    return load_data(source(root, **reading), workers=workers, progress=False)


def paths(split: object) -> list[str]:
    assert isinstance(split, FolderSplit)
    return [p.decode() for p in split.paths]


def everything(split: object) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(split.batches(7))  # type: ignore[attr-defined]
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_folder(root, per_class=20, sizes=SIZES)
    return root


def test_every_class_is_in_every_split_and_the_seed_fixes_which_images(shapes: Path) -> None:
    data = load(shapes, image_size=16)
    assert data.labels == sorted(class_names()) and data.notes["layout"] == "class folders"
    assert data.describe() == {"name": shapes.name, "train": 96, "val": 12, "test": 12}
    splits = [paths(data.train), paths(data.val), paths(data.test)]
    assert sum(len(s) for s in splits) == len(set().union(*map(set, splits))) == 120  # disjoint, complete
    for split in (data.train, data.val, data.test):
        assert sorted(set(split.y.tolist())) == list(range(6))
        assert split.y.tolist() != sorted(split.y.tolist())  # shuffled: a head of a split is a sample of it
    assert paths(load(shapes, image_size=16).val) == splits[1]
    assert paths(load(shapes, image_size=16, split_seed=1).val) != splits[1]


def test_a_split_folder_layout_is_used_as_it_is(tmp_path: Path) -> None:
    write_folder(tmp_path, per_class=10, split_folders=True)
    data = load(tmp_path, image_size=16)
    assert data.notes["layout"] == "train/val/test" and data.labels == sorted(class_names())
    assert (len(data.train), len(data.val), len(data.test)) == (48, 6, 6)
    for split, name in ((data.train, "train"), (data.val, "val"), (data.test, "test")):
        assert all(Path(p).parts[-3] == name for p in paths(split))
    shutil.rmtree(tmp_path / "test")
    carved = load(tmp_path, image_size=16)  # no test/: one image per class cut from train
    assert carved.notes["layout"] == "train/val"
    assert (len(carved.train), len(carved.val), len(carved.test)) == (42, 6, 6)
    assert {Path(p).parts[-3] for p in paths(carved.test)} == {"train"}


def test_batches_are_the_servers_conversion_of_each_file_in_any_worker(shapes: Path) -> None:
    """Training decodes in worker processes exactly what the server decodes from an upload."""
    data = load(shapes, workers=2, image_size=24, resize="center-crop")
    x, y = everything(data.val)
    assert x.shape == (12, 3, 24, 24) and y.tolist() == data.val.y.tolist()
    for path, xi in zip(paths(data.val), x, strict=True):
        served = image_to_input(open_image(Path(path).read_bytes()), data.input)
        assert np.array_equal(xi.numpy(), served)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    x0 = torch.cat([b for b, _ in load(shapes, workers=0, image_size=24, resize="center-crop").val.batches(5, order)])
    assert torch.equal(x0, x[order])


def test_per_channel_statistics_are_measured_on_the_training_images(shapes: Path) -> None:
    data = load(shapes, image_size=16)
    pixels = np.stack([image_to_pixels(open_image(Path(p).read_bytes()), data.input) for p in paths(data.train)])
    scaled = pixels.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(data.input.mean, scaled.mean(0), atol=1e-6)
    np.testing.assert_allclose(data.input.std, scaled.std(0), atol=1e-6)
    assert len(set(data.input.mean)) == 3 and data.notes["input_measured"]["statistics_images"] == 96
    x, _ = everything(data.train)  # normalised by them: each channel near mean 0, std 1
    np.testing.assert_allclose(x.mean((0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(x.std((0, 2, 3)), 1, atol=1e-2)


def test_size_and_colour_come_from_the_images_unless_given(shapes: Path, tmp_path: Path) -> None:
    auto = load(shapes)
    assert (auto.input.shape, auto.input.color_mode) == ((3, 40, 40), "RGB")  # median shorter side of 32, 40, 40
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i, (w, h) in enumerate([(24, 30), (24, 24), (40, 24), (24, 50), (10, 10)] * 2):
            Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    grey = load(tmp_path)
    assert (grey.input.shape, grey.input.color_mode) == ((1, 24, 24), "L")  # 4 in 5 have a shorter side of 24
    given = load(shapes, image_size=12, color="grey")
    assert (given.input.shape, given.input.color_mode) == ((1, 12, 12), "L")


def corrupt_folder(root: Path) -> Path:
    write_folder(root, per_class=10)
    bad = root / "red-circle" / "zz-corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)  # the right signature, then garbage
    (root / "red-circle" / "notes.txt").write_text("not an image")
    return bad


def test_an_unreadable_image_is_left_out_and_counted_or_stops_the_run(tmp_path: Path) -> None:
    bad = corrupt_folder(tmp_path / "imgs")
    data = load(tmp_path / "imgs", image_size=16, color="rgb")
    assert data.notes["ignored_files"] == 1  # notes.txt
    assert sum(len(everything(s)[1]) for s in (data.train, data.val, data.test)) == 60  # of 61 listed
    assert list(data.notes["skipped"]) == [str(bad)] and "cannot decode image" in data.notes["skipped"][str(bad)]

    with pytest.raises(DataError, match=rf"{bad}: cannot decode image.*--bad-images skip"):
        failing = load(tmp_path / "imgs", image_size=16, color="rgb", bad_images="fail")  # met here, or
        for split in (failing.train, failing.val, failing.test):  # when its split is read
            everything(split)

    with pytest.raises(SystemExit) as stopped:
        main(
            ["train", "--data-dir", str(tmp_path / "imgs"), "--bad-images", "fail", "--out", str(tmp_path / "r"), *TINY]
        )
    assert str(stopped.value.code).startswith(f"branchserve train: {bad}: cannot decode image")
    main(["train", "--data-dir", str(tmp_path / "imgs"), "--out", str(tmp_path / "run"), *TINY])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["data"]["skipped"]) == [str(bad)] and summary["data"]["ignored_files"] == 1


def test_images_are_decoded_only_when_a_batch_needs_them(tmp_path: Path) -> None:
    """A corrupt image in test/ goes unnoticed until test batches are read: nothing is decoded up front."""
    write_folder(tmp_path, per_class=10, split_folders=True)
    bad = tmp_path / "test" / "blue-square" / "zz.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    data = load(tmp_path, image_size=16, color="rgb")
    everything(data.train)
    assert data.notes["skipped"] == {}
    everything(data.test)
    assert list(data.notes["skipped"]) == [str(bad)]


def test_classes_with_too_few_images_are_named(tmp_path: Path) -> None:
    write_folder(tmp_path / "few", per_class=5, classes=["red-circle", "green-circle", "blue-circle"])
    for f in sorted((tmp_path / "few" / "green-circle").iterdir())[2:]:
        f.unlink()
    for f in (tmp_path / "few" / "red-circle").iterdir():
        f.unlink()
    with pytest.raises(
        DataError, match=r"too few images in class green-circle \(0 train, 1 val, 1 test\); red-circle \(0 train"
    ):
        load(tmp_path / "few", image_size=16)
    write_folder(tmp_path / "split", per_class=10, split_folders=True, classes=["red-circle", "blue-circle"])
    for f in (tmp_path / "split" / "val" / "blue-circle").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"too few images in class blue-circle \(8 train, 0 val, 1 test\)"):
        load(tmp_path / "split", image_size=16)
    write_folder(tmp_path / "one", per_class=5, classes=["red-circle"])
    with pytest.raises(DataError, match="1 class folders; need at least 2"):
        load(tmp_path / "one", image_size=16)
