"""The training loop: phases of SGD/AdamW with a cosine schedule, a checkpoint every epoch, resume.

Everything random is drawn from generators seeded by (seed, epoch), so a resumed run draws the
same batches and augmentations as one that never stopped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from branchserve.training.backbones.build import backbone_record, build_model, model_from_checkpoint
from branchserve.training.backbones.init import final_exit_change, init_record
from branchserve.training.backbones.spec import BackboneSpec
from branchserve.training.config import ArchConfig, RegimeConfig
from branchserve.training.data import Dataset, Samples, augment
from branchserve.training.model import BranchedNet, stage_macs
from branchserve.training.provenance import checkout
from branchserve.training.regime import Phase, phases

CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
LOG = "log.jsonl"


class ResumeError(ValueError):
    """`--resume` into a run folder whose checkpoint was trained with another configuration."""


def set_trainable(model: BranchedNet, phase: Phase) -> list[nn.Parameter]:
    """Mark parameters trainable by prefix and return them; everything else gets no gradient."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(tuple(f"{t}." for t in phase.trainable)))
        if p.requires_grad:
            params.append(p)
    return params


def set_modes(model: BranchedNet, phase: Phase) -> None:
    """Train mode, except modules a phase keeps fixed: eval mode stops their BatchNorm statistics moving."""
    model.train()
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in phase.frozen_eval):
            module.eval()


def exit_losses(logits: list[Tensor], y: Tensor, cfg: RegimeConfig) -> list[Tensor]:
    """Cross-entropy per exit; with self-distillation, early exits also match the final exit's soft labels."""
    ce = [F.cross_entropy(z, y) for z in logits]
    if cfg.objective == "ce" or len(logits) == 1:
        return ce
    t, a = cfg.distill_temperature, cfg.distill_alpha
    teacher = F.softmax(logits[-1].detach() / t, dim=1)
    out = []
    for z, loss in zip(logits[:-1], ce[:-1], strict=True):
        kd = F.kl_div(F.log_softmax(z / t, dim=1), teacher, reduction="batchmean") * t * t
        out.append((1 - a) * loss + a * kd)
    return [*out, ce[-1]]


@torch.no_grad()
def evaluate(model: BranchedNet, split: Samples, batch_size: int = 1000) -> list[float]:
    """Accuracy of every exit on a split (on the images that could be read)."""
    was_training = model.training
    model.eval()
    correct, seen = torch.zeros(len(model.heads)), 0
    for x, y in split.batches(batch_size):
        for k, z in enumerate(model(x.contiguous(memory_format=torch.channels_last))):
            correct[k] += (z.argmax(1) == y).sum()
        seen += len(y)
    model.train(was_training)
    return (correct / max(seen, 1)).tolist()


def train_epoch(
    model: BranchedNet,
    phase: Phase,
    opt: torch.optim.Optimizer,
    split: Samples,
    cfg: RegimeConfig,
    epoch: int,
    first_step: int,
    phase_steps: int,
    progress: bool = False,
) -> float:
    """One pass over `split` in shuffled batches (a bar over them with `progress`); returns the mean weighted loss."""
    set_modes(model, phase)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(len(split), generator=gen)
    steps = math.ceil(len(split) / cfg.batch_size)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress)
    running, done = 0.0, 0
    for s, (images, labels) in enumerate(split.batches(cfg.batch_size, order)):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(phase.lr, first_step + s, phase_steps)
        x = augment(images, gen).contiguous(memory_format=torch.channels_last)
        losses = exit_losses(model(x), labels, cfg)
        loss = sum(w * term for w, term in zip(phase.weights, losses, strict=True) if w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running, done = running + loss.item(), done + 1
        bar.update(1)
        if s % 20 == 0:
            bar.set_postfix_str(f"loss {running / done:.3f}")
    bar.close()
    return running / max(done, 1)


def make_optimizer(params: list[nn.Parameter], cfg: RegimeConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * step / max(total, 1)))


@dataclass
class RunState:
    """Where a run stands after its last finished epoch; what a checkpoint holds besides the weights."""

    epoch: int = 0
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    phase: str | None = None
    optimizer: dict[str, Any] | None = None


def train(
    cfg: RegimeConfig,
    data: Dataset,
    out: Path,
    base_arch: ArchConfig | None = None,
    widths: Sequence[int] | None = None,
    resume: bool = False,
    threads: int | None = None,
    train_limit: int | None = None,
    eval_limit: int | None = None,
    progress: bool = True,
    backbone: BackboneSpec | None = None,
    init: Path | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run in `out`; returns the summary also written to `out/summary.json`.

    `train_limit` trains on the first N training images and `eval_limit` scores validation and
    test on their first N only: quick trials, recorded as such in the summary. `backbone` picks
    another backbone than the built-in one; `init` starts from a trained backbone's weights.
    """
    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    backbone = backbone or BackboneSpec()
    if widths:
        channels, size, _ = data.input.shape
        base = base_arch or ArchConfig(in_channels=channels, image_size=size, num_classes=len(data.labels)).scaled()
        base_arch = base.with_widths(widths)

    def build() -> BranchedNet:
        model = build_model(cfg, backbone, data.input, len(data.labels), base_arch, init)
        return model.to(memory_format=torch.channels_last)

    model = build()
    plan = phases(cfg, model)
    state = restore(model, cfg, out) if resume else RunState()
    (out / LOG).write_text("".join(json.dumps(row) + "\n" for row in state.history))  # what the checkpoint holds

    train_split, val = data.train.head(train_limit), data.val.head(eval_limit)
    bar = tqdm(
        total=sum(p.epochs for p in plan), initial=state.epoch, desc=out.name, unit="epoch", disable=not progress
    )
    first_epoch = 0
    for phase in plan:
        for val_accuracy in run_phase(model, phase, first_epoch, cfg, train_split, val, state, progress):
            save_checkpoint(out, model, cfg, data, state)
            bar.set_postfix_str(phase.name + " val " + " ".join(f"{a:.3f}" for a in val_accuracy))
            bar.update(1)
        first_epoch += phase.epochs
    bar.close()

    summary = summarize(cfg, model, plan, data, state, train_limit, eval_limit)
    if init:
        summary["init"] = {**init_record(init), "final_exit_val": final_exit_change(build(), model, val)}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_phase(
    model: BranchedNet,
    phase: Phase,
    first_epoch: int,
    cfg: RegimeConfig,
    train_split: Samples,
    val: Samples,
    state: RunState,
    progress: bool = False,
) -> Iterator[list[float]]:
    """Train the epochs of `phase` that `state` has not done yet, updating `state` after each; yields
    each epoch's validation accuracy per exit, so the caller can checkpoint and report."""
    done = state.epoch - first_epoch
    if done >= phase.epochs:
        return
    opt = make_optimizer(set_trainable(model, phase), cfg, phase.lr)
    if done > 0 and state.phase == phase.name and state.optimizer:
        opt.load_state_dict(state.optimizer)  # resuming mid-phase: momentum as it was
    steps_per_epoch = math.ceil(len(train_split) / cfg.batch_size)
    for e in range(done, phase.epochs):
        t0 = time.perf_counter()
        loss = train_epoch(
            model,
            phase,
            opt,
            train_split,
            cfg,
            first_epoch + e,
            e * steps_per_epoch,
            phase.epochs * steps_per_epoch,
            progress,
        )
        val_accuracy = evaluate(model, val)
        state.elapsed_s += time.perf_counter() - t0
        state.epoch, state.phase, state.optimizer = first_epoch + e + 1, phase.name, opt.state_dict()
        state.history.append(
            {
                "epoch": state.epoch,
                "phase": phase.name,
                "loss": loss,
                "val_accuracy": val_accuracy,
                "elapsed_s": state.elapsed_s,
            }
        )
        yield val_accuracy


def save_checkpoint(out: Path, model: BranchedNet, cfg: RegimeConfig, data: Dataset, state: RunState) -> None:
    """Weights and run state after an epoch, written atomically; the epoch's log line goes out with it."""
    path = out / CHECKPOINT
    checkpoint = {
        "config": cfg.model_dump(),
        "arch": asdict(model.arch),
        "model": model.state_dict(),
        "backbone": backbone_record(model),
        **vars(state),
        "labels": data.labels,
        "input": data.input.model_dump(),
    }
    torch.save(checkpoint, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    with (out / LOG).open("a") as f:
        f.write(json.dumps(state.history[-1]) + "\n")


def restore(model: BranchedNet, cfg: RegimeConfig, out: Path) -> RunState:
    """Load the run folder's checkpoint into `model`, if there is one, and return where it stood."""
    path = out / CHECKPOINT
    if not path.is_file():
        return RunState()
    ckpt = torch.load(path, weights_only=False)
    if ckpt["config"] != cfg.model_dump() or ckpt.get("backbone") != backbone_record(model):
        raise ResumeError(f"{path} was trained with another configuration; drop --resume or use a new --out")
    model.load_state_dict(ckpt["model"])
    return RunState(ckpt["epoch"], ckpt["elapsed_s"], ckpt["history"], ckpt["phase"], ckpt.get("optimizer"))


def summarize(
    cfg: RegimeConfig,
    model: BranchedNet,
    plan: list[Phase],
    data: Dataset,
    state: RunState,
    train_limit: int | None,
    eval_limit: int | None,
) -> dict[str, Any]:
    """Everything a finished run is: what export reads back, and what a reader needs to reproduce it."""
    return {
        "config": cfg.model_dump(),
        "arch": asdict(model.arch),
        "backbone": backbone_record(model),
        "phases": [asdict(p) for p in plan],
        "data": {
            **data.describe(),
            "source": data.source.model_dump(mode="json") if data.source else None,
            "train_limit": train_limit,
            "eval_limit": eval_limit,
            **data.notes,
        },
        "input": data.input.model_dump(),
        "val_accuracy": evaluate(model, data.val.head(eval_limit)),
        "test_accuracy": evaluate(model, data.test.head(eval_limit)),
        "stage_macs": stage_macs(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": state.epoch,
        "wall_time_s": round(state.elapsed_s, 1),
        "torch_threads": torch.get_num_threads(),
        **asdict(checkout()),
    }


def load_model(run_dir: Path) -> tuple[BranchedNet, dict[str, Any]]:
    """Rebuild a trained model from a run folder's checkpoint, in eval mode."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train a model into {run_dir} first")
    ckpt = torch.load(path, weights_only=False)
    return model_from_checkpoint(ckpt), ckpt
