"""`--init`: start from a trained network's weights, and say afterwards how far its final exit moved.

The weights come from a state-dict file (plain, or under a `state_dict` or `model` key, as
training scripts save them) or from a branchserve run folder. What they must match is the
backbone in its own layout: for a cut backbone the module's own `state_dict()` (torchvision's keys,
for resnet18), loaded before the cut; for the built-in branched ResNet the layout of its
`unbranched` twin, `stem.*`, `blocks.*` and `heads.0.*` (the final exit), so an unbranched run
initialises a branched one. A branched run's final head is taken as `heads.0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from branchserve.repo.manifest import sha256_of
from branchserve.training.backbones.imported import BackboneError
from branchserve.training.data import Samples
from branchserve.training.model import BranchedNet

CHECKPOINT = "checkpoint.pt"  # a run folder's (train.CHECKPOINT; train imports this module)
OPTIONAL = ("num_batches_tracked",)
"""BatchNorm counters older checkpoints lack (torch fills them in, and nothing reads them in eval mode)."""


def read_state(path: Path) -> dict[str, Tensor]:
    """The state dict `--init` names, in the layout described above."""
    file = path / CHECKPOINT if path.is_dir() else path
    if not file.is_file():
        raise BackboneError(f"--init {path}: not found; give a state-dict file or a run folder holding {CHECKPOINT}")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a file that is not a checkpoint
        raise BackboneError(f"--init {file}: cannot read it as a torch state dict ({type(e).__name__}: {e})") from None
    if isinstance(loaded, dict) and "model" in loaded and "arch" in loaded:
        return run_backbone(loaded)
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise BackboneError(f"--init {file}: holds no state dict (a mapping of parameter names to tensors)")
    return dict(loaded)


def run_backbone(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """A branchserve checkpoint's backbone: a cut backbone's stages under the module's own names, or
    the built-in's stem and blocks with its final head as `heads.0`."""
    state: dict[str, Tensor] = checkpoint["model"]
    if checkpoint.get("backbone"):
        return {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith("blocks.")}
    final = f"heads.{len(checkpoint['arch']['exits']) - 1}."
    body = {k: v for k, v in state.items() if k.startswith(("stem.", "blocks."))}
    return body | {"heads.0." + k.removeprefix(final): v for k, v in state.items() if k.startswith(final)}


def check_keys(expected: dict[str, Tensor], given: dict[str, Tensor], source: Path, target: str) -> None:
    """Every expected key present with its shape, and nothing else; the error names the first that is not."""
    for key, value in expected.items():
        if key not in given:
            if key.endswith(OPTIONAL):
                continue
            sample = ", ".join(list(given)[:3])
            raise BackboneError(f"--init {source}: {target} needs '{key}', which it lacks (its keys start {sample}, …)")
        if given[key].shape != value.shape:
            raise BackboneError(
                f"--init {source}: '{key}' has shape {tuple(given[key].shape)} there but {tuple(value.shape)} in {target}"
            )
    if extra := [k for k in given if k not in expected]:
        raise BackboneError(f"--init {source}: '{extra[0]}' is not a key of {target}")


def init_backbone(backbone: nn.Module, path: Path, what: str) -> None:
    """Load `path` into a backbone before it is cut, checking the keys first."""
    expected = backbone.state_dict()
    given = read_state(path)
    check_keys(expected, given, path, what)
    backbone.load_state_dict({**{k: v for k, v in expected.items() if k.endswith(OPTIONAL)}, **given})


def init_built_in(model: BranchedNet, path: Path) -> None:
    """Load `path` (the unbranched twin's layout) into the built-in model's stem, blocks and final head."""
    final = f"heads.{len(model.heads) - 1}."
    own = model.state_dict()
    layout = {k: k for k in own if k.startswith(("stem.", "blocks."))}
    layout |= {"heads.0." + k.removeprefix(final): k for k in own if k.startswith(final)}
    given = read_state(path)
    check_keys({k: own[v] for k, v in layout.items()}, given, path, "the built-in backbone")
    model.load_state_dict({layout[k]: v for k, v in given.items()}, strict=False)


def init_record(path: Path) -> dict[str, object]:
    file = path / CHECKPOINT if path.is_dir() else path
    return {"path": str(path), "sha256": sha256_of(file)}


@torch.no_grad()
def final_exit_change(before: BranchedNet, after: BranchedNet, split: Samples) -> dict[str, object]:
    """How the final exit's answers on `split` moved from the initial weights to the trained ones."""
    before.eval(), after.eval()
    exact, worst, same, right_before, right_after, n = True, 0.0, 0, 0, 0, 0
    for x, y in split.batches(500):
        x = x.contiguous(memory_format=torch.channels_last)
        a, b = before(x)[-1], after(x)[-1]
        exact = exact and torch.equal(a, b)
        worst = max(worst, float((a - b).abs().max()))
        same += int((a.argmax(1) == b.argmax(1)).sum())
        right_before, right_after, n = (
            right_before + int((a.argmax(1) == y).sum()),
            right_after + int((b.argmax(1) == y).sum()),
            n + len(y),
        )
    return {
        "images": n,
        "bit_exact": exact,
        "max_abs_logit_change": worst,
        "same_prediction": same / max(n, 1),
        "accuracy_before": right_before / max(n, 1),
        "accuracy_after": right_after / max(n, 1),
    }
