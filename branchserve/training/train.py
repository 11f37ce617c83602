"""The training loop: phases of SGD/AdamW with a cosine schedule, a checkpoint every epoch, resume.

Everything random is drawn from generators seeded by (seed, epoch), so a resumed run draws the
same batches and augmentations as one that never stopped.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from branchserve.training.data import Dataset, Split, augment
from branchserve.training.model import ArchConfig, BranchedNet, stage_macs
from branchserve.training.regime import Phase, RegimeConfig, arch_for, phases

CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
LOG = "log.jsonl"


def git_commit() -> str | None:
    """HEAD of the checkout the code runs from, with "-dirty" when it has uncommitted changes."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=here).stdout
    except OSError:
        return None
    return (head + ("-dirty" if dirty.strip() else "")) or None


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
def evaluate(model: BranchedNet, split: Split, batch_size: int = 1000) -> list[float]:
    """Accuracy of every exit on a split."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(len(model.heads))
    for i in range(0, len(split), batch_size):
        x, y = split.x[i : i + batch_size].contiguous(memory_format=torch.channels_last), split.y[i : i + batch_size]
        for k, z in enumerate(model(x)):
            correct[k] += (z.argmax(1) == y).sum()
    model.train(was_training)
    return (correct / max(len(split), 1)).tolist()


def train_epoch(
    model: BranchedNet,
    phase: Phase,
    opt: torch.optim.Optimizer,
    split: Split,
    cfg: RegimeConfig,
    epoch: int,
    first_step: int,
    phase_steps: int,
) -> float:
    """One pass over `split` in shuffled batches; returns the mean weighted loss."""
    set_modes(model, phase)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(len(split), generator=gen)
    steps = math.ceil(len(split) / cfg.batch_size)
    running = 0.0
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(phase.lr, first_step + s, phase_steps)
        idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
        x = augment(split.x[idx], gen).contiguous(memory_format=torch.channels_last)
        losses = exit_losses(model(x), split.y[idx], cfg)
        loss = sum(w * term for w, term in zip(phase.weights, losses, strict=True) if w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
    return running / steps


def make_optimizer(params: list[nn.Parameter], cfg: RegimeConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * step / max(total, 1)))


def train(
    cfg: RegimeConfig,
    data: Dataset,
    out: Path,
    base_arch: ArchConfig | None = None,
    widths: Sequence[int] | None = None,
    resume: bool = False,
    threads: int | None = None,
    train_limit: int | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """Train (or resume) a run in `out`; returns the summary also written to `out/summary.json`."""
    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    base = base_arch or ArchConfig(
        in_channels=data.input.shape[0], image_size=data.input.shape[1], num_classes=len(data.labels)
    )
    if widths:
        base = base.with_widths(widths)
    arch = arch_for(cfg, base)
    torch.manual_seed(cfg.seed)
    model = BranchedNet(arch).to(memory_format=torch.channels_last)
    plan = phases(cfg, model)
    train_split = data.train.head(train_limit)
    steps_per_epoch = math.ceil(len(train_split) / cfg.batch_size)

    start_epoch, elapsed, history = 0, 0.0, []
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=False)
        if ckpt["config"] != cfg.model_dump():
            raise ValueError(f"{ckpt_path} was trained with another configuration; drop --resume or use a new --out")
        model.load_state_dict(ckpt["model"])
        start_epoch, elapsed, history = ckpt["epoch"], ckpt["elapsed_s"], ckpt["history"]
    elif (out / LOG).exists():
        (out / LOG).unlink()

    total_epochs = sum(p.epochs for p in plan)
    bar = tqdm(total=total_epochs, initial=start_epoch, desc=out.name, unit="epoch", disable=not progress)
    epoch = 0
    for phase in plan:
        params = set_trainable(model, phase)
        opt = make_optimizer(params, cfg, phase.lr)
        phase_steps = phase.epochs * steps_per_epoch
        for e in range(phase.epochs):
            if epoch < start_epoch:
                epoch += 1
                continue
            if (
                epoch == start_epoch
                and resume
                and start_epoch
                and ckpt.get("optimizer")
                and ckpt["phase"] == phase.name
            ):
                opt.load_state_dict(ckpt["optimizer"])
            t0 = time.perf_counter()
            loss = train_epoch(model, phase, opt, train_split, cfg, epoch, e * steps_per_epoch, phase_steps)
            val = evaluate(model, data.val)
            elapsed += time.perf_counter() - t0
            epoch += 1
            row = {
                "epoch": epoch,
                "phase": phase.name,
                "loss": loss,
                "val_accuracy": val,
                "elapsed_s": elapsed,
            }
            history.append(row)
            with (out / LOG).open("a") as f:
                f.write(json.dumps(row) + "\n")
            torch.save(
                {
                    "config": cfg.model_dump(),
                    "arch": arch.__dict__,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "phase": phase.name,
                    "epoch": epoch,
                    "elapsed_s": elapsed,
                    "history": history,
                    "labels": data.labels,
                    "input": data.input.model_dump(),
                },
                ckpt_path.with_suffix(".tmp"),
            )
            ckpt_path.with_suffix(".tmp").replace(ckpt_path)
            bar.set_postfix_str(phase.name + " val " + " ".join(f"{a:.3f}" for a in val))
            bar.update(1)
    bar.close()

    summary = {
        "config": cfg.model_dump(),
        "arch": arch.__dict__,
        "phases": [p.__dict__ for p in plan],
        "data": data.describe(),
        "val_accuracy": evaluate(model, data.val),
        "test_accuracy": evaluate(model, data.test),
        "stage_macs": stage_macs(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": epoch,
        "wall_time_s": round(elapsed, 1),
        "torch_threads": torch.get_num_threads(),
        "commit": git_commit(),
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_model(run_dir: Path) -> tuple[BranchedNet, dict[str, object]]:
    """Rebuild a trained model from a run folder's checkpoint, in eval mode."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train a model into {run_dir} first")
    ckpt = torch.load(path, weights_only=False)
    arch = ckpt["arch"]
    model = BranchedNet(
        ArchConfig(**{**arch, "blocks": tuple(map(tuple, arch["blocks"])), "exits": tuple(arch["exits"])})
    )
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt
