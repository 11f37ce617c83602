"""Backbones: the ResNet-18 in torchvision's layout, cuts at named modules (and where a network is
no chain), exits spread by MACs, `--init` from a state dict or a run, `--freeze-backbone` keeping
the final exit bit for bit, and the built-in ResNet scaled for larger inputs."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn
from user_backbone import SkipNet, SmallNet

from branchserve.cli import main
from branchserve.training.backbones.imported import BackboneError, build_imported
from branchserve.training.backbones.init import init_backbone
from branchserve.training.backbones.mobile import mobilenet
from branchserve.training.backbones.resnet18 import ResNet18, resnet18
from branchserve.training.backbones.staged import StagedNet, equidistant_cuts
from branchserve.training.config import ArchConfig, DataSource
from branchserve.training.export import ExportError
from branchserve.training.export.graphs import split_stages
from branchserve.training.model import BranchedNet, stage_macs
from branchserve.training.sources import load_data
from branchserve.training.synthetic import write_folder
from branchserve.training.train import load_model

RESNET18_PARAMETERS = 11_689_512
"""torchvision's published parameter count for resnet18 (3 input channels, 1000 classes)."""
FAST = ["--train-limit", "256", "--eval-limit", "128", "--epochs", "1", "--batch-size", "64", "--threads", "2"]
WIDTHS = ["--widths", ",".join(["16"] * 8)]


def batch_norm(name: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")} | {
        f"{name}.num_batches_tracked": ()
    }


def torchvision_resnet18_layout(in_channels: int = 3, classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """`torchvision.models.resnet18().state_dict()`'s keys and shapes in its order, written out from
    torchvision's definition: a 7×7 conv1 and bn1, four layers of two BasicBlocks (conv1, bn1, conv2,
    bn2, and a downsample Sequential of conv and BatchNorm in the first block of layers 2–4), fc."""
    layout = {"conv1.weight": (64, in_channels, 7, 7), **batch_norm("bn1", 64)}
    cin = 64
    for layer, width in enumerate((64, 128, 256, 512), 1):
        for b in range(2):
            block, first = f"layer{layer}.{b}", cin if b == 0 else width
            layout |= {f"{block}.conv1.weight": (width, first, 3, 3), **batch_norm(f"{block}.bn1", width)}
            layout |= {f"{block}.conv2.weight": (width, width, 3, 3), **batch_norm(f"{block}.bn2", width)}
            if b == 0 and layer > 1:
                layout |= {f"{block}.downsample.0.weight": (width, first, 1, 1)}
                layout |= batch_norm(f"{block}.downsample.1", width)
        cin = width
    return layout | {"fc.weight": (classes, 512), "fc.bias": (classes,)}


def torchvision_checkpoint(path: Path, in_channels: int, classes: int, seed: int = 0) -> OrderedDict:
    """A state dict in torchvision's layout, as torchvision's training saves one (random weights,
    positive running variances)."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, shape in torchvision_resnet18_layout(in_channels, classes).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    write_folder(root, per_class=24)
    return root


def test_resnet18_has_torchvision_keys_shapes_order_and_size() -> None:
    state = resnet18(1000, 3).state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == list(torchvision_resnet18_layout().items())
    assert sum(p.numel() for p in resnet18(1000, 3).parameters()) == RESNET18_PARAMETERS


def test_a_torchvision_checkpoint_initialises_resnet18_and_frozen_stays_bit_exact(
    colours: Path, tmp_path: Path
) -> None:
    """`--init` a state dict in torchvision's layout, `--freeze-backbone`: the run's backbone is the
    file's, and its final exit answers what a plain ResNet-18 with those weights answers."""
    checkpoint = tmp_path / "resnet18_trained_elsewhere.pt"
    state = torchvision_checkpoint(checkpoint, in_channels=3, classes=6)
    run = tmp_path / "adapted"
    flags = ["--backbone", "resnet18", "--branch-after", "layer1,layer2,layer3", "--image-size", "32"]
    main(
        [
            "train",
            "--data-dir",
            str(colours),
            *flags,
            "--init",
            str(checkpoint),
            "--freeze-backbone",
            "--out",
            str(run),
            *FAST,
        ]
    )
    model, _ = load_model(run)
    assert isinstance(model, StagedNet) and model.cuts == ("layer1", "layer2", "layer3")
    trained = model.backbone_state_dict()
    assert list(trained) == list(state) and all(torch.equal(trained[k], state[k]) for k in state)
    plain = ResNet18(6, 3)
    plain.load_state_dict(state)
    data = load_data(DataSource(kind="image-folder", path=colours, image_size=32), workers=0, progress=False)
    x = data.val.loaded().x
    with torch.no_grad():
        assert torch.equal(model(x)[-1], plain.eval()(x))
    moved = json.loads((run / "summary.json").read_text())["init"]
    assert moved["path"] == str(checkpoint) and moved["final_exit_val"]["bit_exact"] is True
    assert moved["final_exit_val"]["max_abs_logit_change"] == 0.0


def test_a_mismatched_state_dict_names_its_first_wrong_key(tmp_path: Path) -> None:
    path = tmp_path / "r18.pt"
    state = torchvision_checkpoint(path, in_channels=3, classes=1000)
    with pytest.raises(BackboneError, match=r"'fc.weight' has shape \(1000, 512\) there but \(6, 512\) in resnet18"):
        init_backbone(resnet18(6, 3), path, "resnet18")
    del state["layer2.0.downsample.0.weight"]
    torch.save({"state_dict": state}, path)  # wrapped, as many training scripts save it
    with pytest.raises(BackboneError, match=r"resnet18 needs 'layer2.0.downsample.0.weight', which it lacks"):
        init_backbone(resnet18(1000, 3), path, "resnet18")
    torch.save({**torchvision_checkpoint(path, 3, 1000), "head.weight": torch.zeros(1)}, path)
    with pytest.raises(BackboneError, match=r"'head.weight' is not a key of resnet18"):
        init_backbone(resnet18(1000, 3), path, "resnet18")
    old = {k: v for k, v in torchvision_checkpoint(path, 3, 1000).items() if "num_batches" not in k}
    torch.save(old, path)  # checkpoints from before BatchNorm counted batches still load
    init_backbone(resnet18(1000, 3), path, "resnet18")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read it as a torch state dict"):
        init_backbone(resnet18(1000, 3), path, "resnet18")


def test_stages_compute_what_the_backbone_computes() -> None:
    torch.manual_seed(0)
    backbone = resnet18(10, 1).eval()
    staged = StagedNet(backbone, ["layer1", "layer2", "layer3"], (1, 32, 32), 10, "resnet18").eval()
    seen = {}
    for name in ("layer1", "layer2", "layer3"):
        backbone.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        final = backbone(x)
        boundaries, h = [], x
        for k in range(4):
            h, _ = staged.run_stage(k, h)
            boundaries.append(h)
    assert all(torch.equal(b, seen[n]) for b, n in zip(boundaries, ("layer1", "layer2", "layer3"), strict=False))
    assert torch.equal(boundaries[-1], final) and torch.equal(staged(x)[-1], final)
    assert {k.split(".", 2)[2] for k in staged.state_dict() if k.startswith("blocks.")} == set(backbone.state_dict())
    assert [s["head_macs"] > 0 for s in stage_macs(staged)] == [True, True, True, False]  # the last is the fc


def test_a_cut_where_the_network_is_not_a_chain_is_refused_by_name() -> None:
    with pytest.raises(
        BackboneError,
        match=r"not a chain at 'block2': besides its output, 'block1.2' computed before it is used after it",
    ):
        StagedNet(SkipNet(6, 3), ["block2"], (3, 32, 32), 6, "user_backbone:build_skip")
    StagedNet(SkipNet(6, 3), ["block1", "block3"], (3, 32, 32), 6, "user_backbone:build_skip")  # chains there
    for cuts, message in (
        (["block9"], "it has no module of that name; blocks: block1, block2, block3, block4, classifier"),
        (["block3", "block1"], "'block1' runs before 'block3'; name the exits in the order they run"),
        (["classifier"], r"an exit after 'classifier' needs a feature map \(N, C, H, W\), it gives \(N, 6\)"),
    ):
        with pytest.raises(BackboneError, match=message):
            StagedNet(SmallNet(6, 3), cuts, (3, 32, 32), 6, "mine")
    with pytest.raises(BackboneError, match=r"its output is \(N, 6\) but the data has 10 classes"):
        StagedNet(SmallNet(6, 3), ["block2"], (3, 32, 32), 10, "mine")


def test_the_onnx_cut_refuses_a_stage_that_needs_more_than_its_input() -> None:
    """The same rule on the exported graph: a value over the cut pulls in nodes the stage cannot run."""
    nodes = [
        helper.make_node("Relu", ["input"], ["a"], name="relu_a"),
        helper.make_node("Neg", ["a"], ["boundary_0"], name="neg"),
        helper.make_node("Identity", ["boundary_0"], ["logits_0"], name="exit_0"),
        helper.make_node("Add", ["boundary_0", "a"], ["logits_1"], name="skip_add"),
    ]
    tensor = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 4])  # noqa: E731
    graph = helper.make_graph(
        nodes, "skip", [tensor("input")], [tensor(n) for n in ("logits_0", "logits_1", "boundary_0")]
    )
    full = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    with pytest.raises(ExportError, match=r"stage 1 is not a chain at its cut: node 'relu_a' needs 'input'"):
        split_stages(full, 2, "input")


def test_exits_spread_by_macs_sit_at_chain_points_in_order() -> None:
    x = torch.zeros(1, 3, 64, 64)
    for backbone, exits in ((mobilenet(6, 3, 64), 4), (resnet18(6, 3), 4), (SkipNet(6, 3), 3)):
        cuts = equidistant_cuts(backbone, exits, x, "net")
        staged = StagedNet(backbone, cuts, (3, 64, 64), 6, "net")  # every cut a chain point, in order
        macs = [s["backbone_macs"] for s in stage_macs(staged)]
        assert len(cuts) == exits - 1 and max(macs) < 2.5 * sum(macs) / exits, (cuts, macs)
    assert "block2" not in equidistant_cuts(SkipNet(6, 3), 3, x, "net")
    with pytest.raises(BackboneError, match=r"only (\d+) blocks can carry an exit .*ask for at most \d+ exits"):
        equidistant_cuts(SmallNet(6, 3), 30, x, "mine")


def test_a_backbone_by_import_path_and_its_errors() -> None:
    assert isinstance(build_imported("user_backbone:build", 6, 3, 32), SmallNet)
    with pytest.raises(BackboneError, match="cannot import no_such_package"):
        build_imported("no_such_package.nets:build", 6, 3, 32)
    with pytest.raises(BackboneError, match="user_backbone has no function or class named nothing"):
        build_imported("user_backbone:nothing", 6, 3, 32)
    with pytest.raises(BackboneError, match=r"returned a str, not a torch\.nn\.Module"):
        build_imported("os:getcwd", 6, 3, 32)
    with pytest.raises(BackboneError, match=r"math:floor: calling it with no arguments failed: .*argument"):
        build_imported("math:floor", 6, 3, 32)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--backbone", "vgg"], "'vgg' is neither branched-resnet, resnet18, mobilenet nor an import path"),
        (
            ["--branch-after", "blocks.1"],
            "--branch-after names modules of other backbones; branched-resnet takes --positions",
        ),
        (
            ["--backbone", "resnet18", "--widths", "8,8,8,8,8,8,8,8"],
            "--widths and --positions shape the built-in backbone",
        ),
        (["--freeze-backbone"], "--freeze-backbone keeps a trained backbone as it is: name it with --init"),
        (["--init", "nowhere.pt"], "--init nowhere.pt: not found"),
        (["--image-size", "4"], "image_size: Input should be greater than or equal to 8"),
        (
            ["--backbone", "resnet18", "--branch-after", "layer1", "--branches", "4"],
            "--branch-after names 1 exits before the final one: drop --branches",
        ),
    ],
)
def test_backbone_flags_stop_in_one_line_before_any_data_loads(tmp_path: Path, flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--out", str(tmp_path / "run"), "--fmnist-dir", str(tmp_path / "absent"), *flags])
    assert str(stopped.value.code).startswith("branchserve train: ") and message in str(stopped.value.code)
    assert not (tmp_path / "run").exists()


def test_an_unbranched_run_adapted_with_a_frozen_backbone_keeps_its_final_exit(tmp_path: Path) -> None:
    """The seed's setting: branch a trained network. Frozen, the final exit answers bit for bit as
    the unbranched model does; trained jointly instead, the run reports how far it moved."""
    plain, adapted, tuned = tmp_path / "plain", tmp_path / "adapted", tmp_path / "tuned"
    main(["train", "--preset", "unbranched", *WIDTHS, *FAST, "--out", str(plain)])
    main(["train", "--init", str(plain), "--freeze-backbone", *WIDTHS, *FAST, "--out", str(adapted)])
    main(["train", "--init", str(plain), "--schedule", "joint", *WIDTHS, *FAST, "--out", str(tuned)])
    before, _ = load_model(plain)
    after, _ = load_model(adapted)
    x = load_data(DataSource(kind="fashion-mnist", path=Path("/usr/share/datasets/fashion-mnist"))).val.x[:256]
    with torch.no_grad():
        assert torch.equal(after(x)[-1], before(x)[0]) and len(after(x)) == 4
    frozen = {k: v for k, v in after.state_dict().items() if k.startswith(("stem.", "blocks.", "heads.3."))}
    assert all(torch.equal(v, before.state_dict()[k.replace("heads.3.", "heads.0.")]) for k, v in frozen.items())
    moved = json.loads((adapted / "summary.json").read_text())["init"]["final_exit_val"]
    assert moved["bit_exact"] and moved["accuracy_before"] == moved["accuracy_after"] and moved["images"] == 128
    changed = json.loads((tuned / "summary.json").read_text())["init"]["final_exit_val"]
    assert not changed["bit_exact"] and changed["max_abs_logit_change"] > 0 and changed["same_prediction"] < 1
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--init", str(plain), "--freeze-backbone", *FAST, "--out", str(tmp_path / "wide")])
    assert "'blocks.0.conv1.weight' has shape (16, 16, 3, 3) there but (24, 16, 3, 3) in the built-in backbone" in str(
        stopped.value.code
    )


def test_the_built_in_backbone_strides_its_stem_for_larger_inputs() -> None:
    for size, stride, first in ((28, 1, 14), (32, 1, 16), (64, 2, 16), (128, 4, 16), (224, 4, 28)):
        arch = ArchConfig(in_channels=3, image_size=size).scaled()
        assert arch.stem_stride == stride
        features = BranchedNet(arch).eval().features(torch.zeros(1, 3, size, size))
        assert features[0].shape[-1] == first and features[-1].shape[-1] == int(np.ceil(first / 4))
    assert isinstance(BranchedNet(ArchConfig().scaled()).stem[-1], nn.ReLU)  # 28×28: the stem as it always was
