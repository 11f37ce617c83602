"""Your own images and your own network, end to end: a generated colour dataset where colour decides
the class, at 32×32 and at 64×64 (from images of other sizes and shapes, centre-cropped), the
built-in mobile-style backbone, and a user's backbone named by import path: trained, exported,
served by the real server, and an uploaded image answered as torch answers it, through the
per-channel normalisation the manifest stores, on the native API and on every Open Inference
Protocol door (REST binary and JSON, gRPC)."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from PIL import Image
from serving import running_server

from branchserve.cli import main
from branchserve.repo.graphcalls import run_chain
from branchserve.repo.imaging import image_to_input, open_image
from branchserve.repo.loading import load_version
from branchserve.repo.manifest import Manifest
from branchserve.repo.sessions import load_session
from branchserve.training.config import DataSource
from branchserve.training.folders import FolderSplit
from branchserve.training.sources import load_data
from branchserve.training.synthetic import COLOURS, write_folder
from branchserve.training.train import load_model

TOLERANCE = 1e-4
PATIENT = ["--max-wait-ms", "5000", "--queue-target-ms", "5000"]  # one client at a time: no overload to shed
TRAIN = ["--epochs", "2", "--finetune-epochs", "1", "--batch-size", "32", "--workers", "2", "--threads", "2"]
WIDTHS = ["--widths", ",".join(["16"] * 8)]
MODELS = {
    "shapes-32": ("c32", WIDTHS),
    "shapes-64": ("c64", [*WIDTHS, "--image-size", "64", "--resize", "center-crop"]),
    "mine": ("c32", ["--backbone", "user_backbone:build", "--branch-after", "block2,block3"]),
    "mobile": ("c32", ["--backbone", "mobilenet", "--branches", "3"]),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """Four runs exported into one repository: (repository, run folder of each model)."""
    root = tmp_path_factory.mktemp("own")
    write_folder(root / "c32", per_class=20)
    write_folder(root / "c64", per_class=20, sizes=((64, 64), (80, 60), (60, 90)), seed=1)
    repo, runs = root / "models", {}
    for name, (folder, flags) in MODELS.items():
        runs[name] = root / "runs" / name
        main(["train", "--data-dir", str(root / folder), *flags, *TRAIN, "--out", str(runs[name])])
        main(["export", str(runs[name]), "--repo", str(repo), "--name", name, "--batch-sizes", "1", "--runs", "50"])
    return repo, runs


def uploads(manifest: Manifest, n: int = 4) -> tuple[list[Path], torch.Tensor]:
    """The first test images of the model's data, and what training's loader makes of them."""
    source = DataSource.model_validate(manifest.provenance["data"]["source"])
    test = load_data(source, manifest.input, workers=0, progress=False).test.head(n)
    assert isinstance(test, FolderSplit)
    return [Path(p.decode()) for p in test.paths], test.loaded().x


def test_colours_of_the_classes_are_one_grey() -> None:
    """A grey model cannot tell the classes' colours apart: colour decides the class."""
    greys = {Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0)) for c in COLOURS.values()}
    assert len(greys) == 1


def test_the_manifest_stores_the_training_splits_per_channel_statistics(trained: tuple[Path, dict[str, Path]]) -> None:
    repo, runs = trained
    for name, run in runs.items():
        manifest = load_version(repo / name / "1")
        source = DataSource.model_validate(manifest.provenance["data"]["source"])
        measured = load_data(source, workers=0, progress=False).input  # measured again from the training split
        assert manifest.input == measured and len(set(manifest.input.mean)) == 3, name
        model, _ = load_model(run)
        assert manifest.input.shape == (3, model.arch.image_size, model.arch.image_size)
    big = load_version(repo / "shapes-64" / "1")
    assert (big.input.shape, big.input.resize, big.provenance["arch"]["stem_stride"]) == ((3, 64, 64), "center-crop", 2)
    mine = load_version(repo / "mine" / "1")
    assert [e.after_module for e in mine.exits] == ["block2", "block3", None]
    assert mine.provenance["backbone"] == {"name": "user_backbone:build", "branch_after": ["block2", "block3"]}


def test_an_upload_is_converted_as_training_converted_it_and_answered_as_torch_answers(
    trained: tuple[Path, dict[str, Path]],
) -> None:
    repo, runs = trained
    with running_server(repo, *PATIENT) as server, server.client() as client:
        for name, run in runs.items():
            version = repo / name / "1"
            manifest = load_version(version)
            meta = client.get(f"/v1/models/{name}").raise_for_status().json()
            assert tuple(meta["input"]["mean"]) == manifest.input.mean and len(meta["input"]["std"]) == 3
            stages = [load_session(version / s.file) for s in manifest.stages]
            files, trained_inputs = uploads(manifest)
            for path, x, expected in zip(files, trained_inputs, torch_logits(run, trained_inputs), strict=True):
                body = path.read_bytes()
                served = image_to_input(open_image(body), manifest.input)
                assert np.array_equal(served, x.numpy()), path  # one conversion, bit for bit
                chain = run_chain(stages, served[None])
                for k, (got, want) in enumerate(zip(chain, expected, strict=True)):
                    assert np.abs(got[0] - want).max() <= TOLERANCE, (name, path, k)
                for budget, exit_ in (({"max_accuracy_drop": "0"}, len(expected) - 1), ({"max_exit": "0"}, 0)):
                    answer = predict(client, name, body, path.suffix, budget)
                    assert answer["exit"] == exit_ and answer["class"] == int(expected[exit_].argmax()), (name, path)
                    probabilities = torch.softmax(torch.from_numpy(expected[exit_]), 0).numpy()
                    assert np.abs(np.asarray(answer["probabilities"]) - probabilities).max() <= TOLERANCE


def test_every_oip_door_takes_the_colour_shape_and_answers_as_torch(trained: tuple[Path, dict[str, Path]]) -> None:
    """Model metadata gives each model's (3, H, W); the uploaded files as BYTES images and their tensors as
    FP32, over REST (binary tensors and JSON) and gRPC, get torch's final-exit logits."""
    repo, runs = trained
    with running_server(repo, *PATIENT) as server:
        rest = thttp.InferenceServerClient(server.url.removeprefix("http://"))
        grpc = tgrpc.InferenceServerClient(server.grpc)
        for name, run in runs.items():
            manifest = load_version(repo / name / "1")
            shape = [-1, *manifest.input.shape]
            assert rest.get_model_metadata(name)["inputs"][0]["shape"] == shape
            assert list(grpc.get_model_metadata(name).inputs[0].shape) == shape
            files, x = uploads(manifest)
            final = torch_logits(run, x)[:, -1]
            images = np.array([p.read_bytes() for p in files], dtype=object)
            for module, client in ((thttp, rest), (tgrpc, grpc)):
                for binary in (True, False) if module is thttp else (True,):
                    for tensor in oip_inputs(module, images, x.numpy(), binary):
                        result = client.infer(name, [tensor], parameters={"max_accuracy_drop": 0.0})
                        assert result.as_numpy("exit").tolist() == [len(manifest.exits) - 1] * len(files)
                        assert np.abs(result.as_numpy("logits") - final).max() <= TOLERANCE, (name, module, binary)
        rest.close()
        grpc.close()


def torch_logits(run: Path, x: torch.Tensor) -> np.ndarray:
    """(N, exits, classes): what the trained torch model says at each exit."""
    model, _ = load_model(run)
    with torch.no_grad():
        return np.stack([z.numpy() for z in model(x)], axis=1)


def oip_inputs(module: object, images: np.ndarray, x: np.ndarray, binary: bool) -> list[object]:
    """The same inputs as OIP tensors: the image files (BYTES; base64 text in JSON) and the tensors the
    server makes of them (FP32)."""
    image = module.InferInput("image", [len(images)], "BYTES")
    tensor = module.InferInput("input", list(x.shape), "FP32")
    if module is thttp:
        elements = images if binary else np.array([base64.b64encode(b).decode() for b in images], dtype=object)
        return [image.set_data_from_numpy(elements, binary_data=binary), tensor.set_data_from_numpy(x, binary)]
    return [image.set_data_from_numpy(images), tensor.set_data_from_numpy(x)]


def predict(client: httpx.Client, name: str, body: bytes, suffix: str, budget: dict[str, str]) -> dict:
    kind = "image/png" if suffix == ".png" else "image/jpeg"
    response = client.post(
        f"/v1/models/{name}/predict",
        content=body,
        headers={"content-type": kind},
        params={"probabilities": "true", **budget},
    )
    return response.raise_for_status().json()["outputs"][0]
