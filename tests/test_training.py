"""Training on small real subsets of Fashion-MNIST: regimes move the right weights, resume, data errors."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, get_args, get_origin

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from branchserve.cli import main, parser
from branchserve.fmnist import DataError, read_idx
from branchserve.repo.loading import load_version
from branchserve.training.cli import QUICK_REGIME, regime, serving_hint
from branchserve.training.config import (
    PRESETS,
    ArchConfig,
    DataSource,
    RegimeConfig,
    arch_for,
    equidistant_positions,
    loss_weights,
)
from branchserve.training.data import Dataset, load_fashion_mnist
from branchserve.training.model import BranchedNet, stage_macs
from branchserve.training.regime import phases
from branchserve.training.sources import load_data
from branchserve.training.train import exit_losses, make_optimizer, set_trainable, train_epoch

TINY = ArchConfig(stem_width=4, blocks=((8, 2), (8, 1), (16, 2), (16, 1)), exits=(3,), head_conv_width=8)


@pytest.fixture(scope="module")
def fmnist() -> Dataset:
    return load_fashion_mnist()


@pytest.fixture(scope="module")
def small(fmnist: Dataset) -> Dataset:
    return Dataset(
        fmnist.name, fmnist.labels, fmnist.input, fmnist.train.head(512), fmnist.val.head(256), fmnist.test.head(256)
    )


def snapshot(model: BranchedNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: BranchedNet) -> set[str]:
    """Top-level modules (stem, blocks.i, heads.k) whose parameters moved (outputs are checked apart)."""
    return {
        ".".join(name.split(".")[:2]) if name.startswith(("blocks", "heads")) else name.split(".")[0]
        for name, p in model.named_parameters()
        if not torch.equal(before[name], p)
    }


def run_phases(cfg: RegimeConfig, data: Dataset) -> tuple[BranchedNet, list[set[str]], list[list[torch.Tensor]]]:
    """Train every phase for its epochs; record what each phase moved and every exit's outputs after it."""
    torch.manual_seed(cfg.seed)
    model = BranchedNet(arch_for(cfg, TINY))
    probe = data.val.x[:64]
    moved, outputs = [], []
    steps = math.ceil(len(data.train) / cfg.batch_size)
    for phase in phases(cfg, model):
        before = snapshot(model)
        opt = make_optimizer(set_trainable(model, phase), cfg, phase.lr)
        for e in range(phase.epochs):
            train_epoch(model, phase, opt, data.train, cfg, e, e * steps, phase.epochs * steps)
        moved.append(changed(before, model))
        with torch.no_grad():
            outputs.append(model.eval()(probe))
    return model, moved, outputs


ALL = {"stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "heads.0", "heads.1", "heads.2", "heads.3"}


@pytest.mark.parametrize("weighting", ["equal", "seed", "increasing", "decreasing", [1.0, 0.0, 0.0, 1.0]])
def test_joint_weighting_moves_what_has_weight(small: Dataset, weighting: str | list[float]) -> None:
    cfg = RegimeConfig(weighting=weighting, schedule="joint", epochs=1, batch_size=128)
    _, moved, _ = run_phases(cfg, small)
    if isinstance(weighting, list):
        assert moved == [ALL - {"heads.1", "heads.2"}]  # exits with zero weight learn nothing
    else:
        assert moved == [ALL]


def test_loss_weights_presets() -> None:
    assert loss_weights("seed", 4) == pytest.approx([0.2, 0.2, 0.2, 0.4])
    assert loss_weights("equal", 4) == pytest.approx([0.25] * 4)
    assert loss_weights("decreasing", 4) == pytest.approx([0.4, 0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="non-negative"):
        loss_weights([1.0, -1.0], 2)


def test_finetune_after_last_branch_keeps_early_exits_exact(small: Dataset) -> None:
    cfg = RegimeConfig(schedule="joint+finetune", epochs=2, finetune_epochs=1, batch_size=128)
    _, moved, outputs = run_phases(cfg, small)
    assert moved[0] == ALL
    assert moved[1] == {"blocks.3", "heads.3"}  # only what no earlier exit sees
    joint, tuned = outputs
    for k in range(3):
        assert torch.equal(joint[k], tuned[k]), f"exit {k} changed during the finetune"
    assert not torch.equal(joint[3], tuned[3])


def test_finetune_all_then_refit_branch_heads(small: Dataset) -> None:
    cfg = RegimeConfig(schedule="joint+finetune", finetune_scope="all", epochs=3, finetune_epochs=1, refit_epochs=1)
    _, moved, outputs = run_phases(cfg, small)
    assert [p.name for p in phases(cfg, BranchedNet(arch_for(cfg, TINY)))] == ["joint", "finetune", "refit"]
    assert moved[1] == ALL - {"heads.0", "heads.1", "heads.2"}
    assert moved[2] == {"heads.0", "heads.1", "heads.2"}
    assert torch.equal(outputs[1][3], outputs[2][3])  # the refit leaves the final exit alone


def test_backbone_first_trains_final_exit_then_all(small: Dataset) -> None:
    cfg = RegimeConfig(schedule="backbone-first", epochs=2, backbone_epochs=1, batch_size=128)
    _, moved, _ = run_phases(cfg, small)
    assert moved == [ALL - {"heads.0", "heads.1", "heads.2"}, ALL]


def test_self_distillation_trains_every_exit(small: Dataset) -> None:
    plain = RegimeConfig(schedule="joint", epochs=1, batch_size=128)
    distill = plain.model_copy(update={"objective": "ce+distill"})
    _, _, out_ce = run_phases(plain, small)
    model_kd, moved_kd, out_kd = run_phases(distill, small)
    model_kd.eval()
    assert moved_kd == [ALL]
    assert not torch.equal(out_ce[0][0], out_kd[0][0])
    logits = [o.detach() for o in model_kd(small.val.x[:32])]
    ce = exit_losses(logits, small.val.y[:32], plain)
    kd = exit_losses(logits, small.val.y[:32], distill)
    assert torch.equal(ce[-1], kd[-1])  # the final exit is the teacher: plain cross-entropy
    assert all(not torch.equal(a, b) for a, b in zip(ce[:-1], kd[:-1], strict=True))


def test_unbranched_preset_has_one_exit_and_same_backbone() -> None:
    branched = BranchedNet(arch_for(RegimeConfig(**PRESETS["progressive"]), ArchConfig()))
    plain = BranchedNet(arch_for(RegimeConfig(**PRESETS["unbranched"]), ArchConfig()))
    assert len(plain.heads) == 1 and len(branched.heads) == 4
    assert [n for n, _ in plain.blocks.named_parameters()] == [n for n, _ in branched.blocks.named_parameters()]
    macs = stage_macs(branched)
    assert all(m["head_macs"] < m["backbone_macs"] / 5 for m in macs)
    assert sum(m["backbone_macs"] for m in macs) == stage_macs(plain)[0]["backbone_macs"]


def test_positions() -> None:
    assert equidistant_positions(8, 4) == (1, 3, 5, 7)
    assert equidistant_positions(8, 1) == (7,)
    assert arch_for(RegimeConfig(branches=2, positions=[2, 7]), ArchConfig()).exits == (2, 7)
    with pytest.raises(ValueError, match="last exit"):
        BranchedNet(ArchConfig(exits=(1, 3)))


def test_positions_and_weights_from_the_command_line_text() -> None:
    cfg = RegimeConfig(**{**PRESETS["progressive"], "positions": "2,5,7"})
    assert (cfg.branches, cfg.positions) == (3, [2, 5, 7])  # the number of exits follows the positions
    assert arch_for(cfg, ArchConfig()).exits == (2, 5, 7)
    assert RegimeConfig(weighting="1,1,1,2").weighting == [1.0, 1.0, 1.0, 2.0]
    with pytest.raises(ValidationError, match="3 positions given for 4 branches"):
        RegimeConfig(branches=4, positions="2,5,7")
    with pytest.raises(ValidationError, match="weighting: 4 weights given for 3 branches"):
        RegimeConfig(positions="2,5,7", weighting="1,1,1,2")


def cli(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "branchserve.cli", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,  # type: ignore[arg-type]
    )


def test_resume_after_kill_continues_from_saved_epoch(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--out", str(out), "--epochs", "3", "--finetune-epochs", "1", "--train-limit", "1024", "--threads", "1"]
    proc = cli(*args, start_new_session=True)
    log = out / "log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.exists() and log.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert done_before and done_before[-1] < 3, "the run finished before it could be interrupted"

    resumed = cli(*args, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert epochs == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and len(summary["test_accuracy"]) == 4
    assert summary["config"]["schedule"] == "joint+finetune"


def make_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    shapes = [((20, 30), "L", "png"), ((64, 48), "RGB", "jpg"), ((28, 28), "RGBA", "png"), ((100, 90), "RGB", "jpeg")]
    for c, name in enumerate(["boots", "hats", "socks"]):
        (root / name).mkdir(parents=True)
        for i in range(8):
            (w, h), mode, ext = shapes[i % len(shapes)]
            pixels = rng.integers(0, 255, (h, w, len(mode)), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels.squeeze()).save(root / name / f"{i}.{ext}")


def test_folder_dataset_mixed_sizes_and_colours(tmp_path: Path) -> None:
    source = DataSource(kind="image-folder", path=tmp_path / "imgs", image_size=28, color="grey")
    make_folder(tmp_path / "imgs")
    data = load_data(source, workers=0, progress=False)
    assert data.labels == ["boots", "hats", "socks"]
    assert (len(data.train), len(data.val), len(data.test)) == (18, 3, 3)  # 6, 1 and 1 of each class
    x = data.train.loaded().x
    assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
    assert sorted(set(data.train.y.tolist())) == [0, 1, 2]


def test_a_folder_trained_run_exports_from_its_own_record(tmp_path: Path) -> None:
    """No --data-dir at export: the run's summary says which folder and split it was trained on."""
    make_folder(tmp_path / "imgs")
    run, repo = tmp_path / "run", tmp_path / "models"
    flags = ["--epochs", "2", "--finetune-epochs", "1", "--batch-size", "8", "--widths", "8,8,8,8,8,8,8,8"]
    trained = cli("--data-dir", str(tmp_path / "imgs"), "--out", str(run), *flags)
    _, stderr = trained.communicate(timeout=300)
    assert trained.returncode == 0, stderr
    assert "scanning" in stderr and "images" in stderr  # progress while the folder is listed
    assert "epoch 1:" in stderr and "batch" in stderr  # and over each epoch's batches
    summary = json.loads((run / "summary.json").read_text())
    size = summary["input"]["shape"][1]
    assert f"input: {size}×{size} RGB (stretch), per-channel mean/std" in stderr  # the spec, said before training
    source = {"kind": "image-folder", "path": str((tmp_path / "imgs").resolve()), "split_seed": 0, "image_size": None}
    source |= {"color": None, "resize": "stretch", "bad_images": "skip"}
    assert {k: v for k, v in summary["data"].items() if k != "input_measured"} == {
        "name": "imgs",
        "train": 18,
        "val": 3,
        "test": 3,
        "source": source,
        "train_limit": None,
        "eval_limit": None,
        "layout": "class folders",
        "ignored_files": 0,
        "skipped": {},
    }
    assert summary["data"]["input_measured"]["statistics_images"] == 18 and summary["input"]["color_mode"] == "RGB"
    export = [sys.executable, "-m", "branchserve.cli", "export", str(run), "--repo", str(repo), "--name", "folder"]
    exported = subprocess.run([*export, "--batch-sizes", "1", "--runs", "50"], capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.splitlines()[-1] == (
        f"folder/1 is now the latest version of folder: `branchserve serve --repository {repo}` will serve it"
    )
    assert "warn" not in exported.stderr.lower() and "torchvision" not in exported.stderr  # tqdm bars only
    manifest = load_version(repo / "folder" / "1")
    assert manifest.labels == ["boots", "hats", "socks"]
    assert manifest.provenance["data"]["source"] == summary["data"]["source"]


def test_bad_paths_and_corrupt_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt"):
        read_idx(bad)
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05ab"))  # says 5 labels, holds 2
    with pytest.raises(DataError, match="corrupt"):
        read_idx(bad)
    with pytest.raises(DataError, match="not a folder"):
        load_data(DataSource(kind="image-folder", path=tmp_path / "missing"))
    proc = cli("--fmnist-dir", str(tmp_path), "--out", str(tmp_path / "run"))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert stderr.strip().splitlines() == [
        f"branchserve train: {tmp_path}/train-images-idx3-ubyte.gz not found: "
        "install it with 'apt-get install -y dataset-fashion-mnist' "
        "or point BRANCHSERVE_FMNIST_DIR (or --fmnist-dir) at a folder holding its .gz files"
    ]


def test_block_widths_change_channels_not_strides_or_exits() -> None:
    arch = ArchConfig().with_widths([16, 16, 48, 48, 96, 96, 96, 96])
    assert [w for w, _ in arch.blocks] == [16, 16, 48, 48, 96, 96, 96, 96]
    assert [s for _, s in arch.blocks] == [s for _, s in ArchConfig().blocks] and arch.exits == ArchConfig().exits
    logits = BranchedNet(arch).eval()(torch.zeros(2, 1, 28, 28))
    assert [tuple(z.shape) for z in logits] == [(2, 10)] * 4
    assert stage_macs(BranchedNet(arch))[0]["backbone_macs"] < stage_macs(BranchedNet(ArchConfig()))[0]["backbone_macs"]
    for bad in ([16] * 7, [16, 0, 48, 48, 96, 96, 96, 96]):
        with pytest.raises(ValueError, match="8 positive block widths"):
            ArchConfig().with_widths(bad)


def train_flags(*flags: str) -> argparse.Namespace:
    return parser().parse_args(["train", "--out", "unused", *flags])


def test_the_command_line_imports_no_torch_and_stops_bad_flags_in_one_line(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "import branchserve.training.config\n"
        "from branchserve.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "finally:\n"
        "    assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    bad = ["train", "--out", str(tmp_path / "run"), "--weighting", "1,1,x"]
    proc = subprocess.run([sys.executable, "-c", script, *bad], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "branchserve train: weighting: expected one of equal, seed, increasing, decreasing "
        "or weights such as 1,1,1,2, got '1,1,x'"
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--epochs", "1"],
            "joint+finetune needs finetune_epochs (2) < epochs (1): "
            "raise --epochs, lower --finetune-epochs or use --schedule joint",
        ),
        (
            ["--weighting", "0,0,0,0"],
            "weighting: loss weights must be non-negative with a positive sum, got [0.0, 0.0, 0.0, 0.0]",
        ),
        (
            ["--weighting", "foo"],
            "weighting: expected one of equal, seed, increasing, decreasing or weights such as 1,1,1,2, got 'foo'",
        ),
        (["--positions", "2,5,9"], "positions: the last exit must sit after the last block, 7, got (2, 5, 9)"),
        (["--widths", "16,16"], "widths: need 8 positive block widths, got [16, 16]"),
        (["--widths", "16,x"], "widths: expected block widths such as 32,32,48,48,96,96,96,96, got '16,x'"),
        (
            ["--epochs", "0", "--lr", "-1"],
            "epochs: Input should be greater than or equal to 1; lr: Input should be greater than 0",
        ),
    ],
)
def test_bad_flags_stop_in_one_line_before_any_data_loads(tmp_path: Path, flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as stopped:  # a missing dataset would say so if it were read first
        main(["train", "--out", str(tmp_path / "run"), "--fmnist-dir", str(tmp_path / "absent"), *flags])
    assert stopped.value.code == f"branchserve train: {message}"
    assert not (tmp_path / "run").exists()


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_states_its_default_and_regime_flags_come_from_the_config() -> None:
    commands = subcommands()
    for command in ("train", "export", "analyze", "study"):
        for action in commands[command]._actions:
            if action.option_strings and not action.required and action.dest != "help":
                assert "(default" in (action.help or ""), f"{command} {action.option_strings[0]} states no default"
    train = {action.dest: action for action in commands["train"]._actions}
    for name, field in RegimeConfig.model_fields.items():
        assert f"(default {field.default}" in (train[name].help or ""), name
        if get_origin(field.annotation) is Literal:
            assert tuple(train[name].choices or ()) == get_args(field.annotation), name
    assert "(default 4, unbranched: 1)" in (train["branches"].help or "")
    assert tuple(train["preset"].choices or ()) == tuple(PRESETS)


def test_quick_keeps_every_preset_valid_and_flags_still_win() -> None:
    for preset in PRESETS:
        cfg, _ = regime(train_flags("--quick", "--preset", preset))
        assert cfg.epochs == QUICK_REGIME["epochs"]
    for scope_or_schedule in (["--finetune-scope", "all"], ["--schedule", "backbone-first"]):
        cfg, _ = regime(train_flags("--quick", *scope_or_schedule))
        assert sum(p.epochs for p in phases(cfg, BranchedNet(arch_for(cfg, TINY)))) == cfg.epochs
    cfg, widths = regime(train_flags("--quick", "--epochs", "5", "--widths", "8,8,8,8,8,8,8,8"))
    assert (cfg.epochs, cfg.finetune_epochs, widths) == (5, 1, [8] * 8)


def test_quick_trial_is_limited_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "try"
    flags = ["--train-limit", "256", "--eval-limit", "100", "--batch-size", "64", "--widths", "8,8,8,8,8,8,8,8"]
    main(["train", "--quick", *flags, "--head-conv-width", "0", "--out", str(out)])
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (printed["train_limit"], printed["eval_limit"]) == (256, 100)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["data"]["train_limit"], summary["data"]["eval_limit"]) == (256, 100)
    assert (summary["data"]["val"], summary["data"]["test"]) == (10_000, 10_000)  # the splits, whole
    # heads without their 1×1 conv: pooling to 4×4 and one linear layer, 8·16 features → 10 classes
    assert summary["arch"]["head_conv_width"] == 0 and {s["head_macs"] for s in summary["stage_macs"]} == {1280}
    assert [(p["name"], p["epochs"]) for p in summary["phases"]] == [("joint", 2), ("finetune", 1)]
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    for accuracy in summary["val_accuracy"] + summary["test_accuracy"]:
        assert round(accuracy * 100, 4).is_integer()  # scored on 100 images


def test_export_names_the_version_serve_will_pick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for version in ("1", "3", ".export-4"):
        (tmp_path / "models" / "shoes" / version).mkdir(parents=True)
    repo = Path("models")  # serve's default: no --repository needed
    assert serving_hint(repo, repo / "shoes" / "3") == (
        "shoes/3 is now the latest version of shoes: `branchserve serve` will serve it"
    )
    assert serving_hint(repo, repo / "shoes" / "1") == (
        "shoes/1 is not the latest version of shoes: `branchserve serve` will serve shoes/3"
    )
    other = tmp_path / "models"
    assert serving_hint(other, other / "shoes" / "3").endswith(
        f"`branchserve serve --repository {other}` will serve it"
    )
