"""Runs, analyses and studies as plain data: the regime's knobs and presets, the backbone's shape,
the data source, the analysis settings and the study grid.

Pure Python and pydantic, no torch: the command line checks every flag against these before
importing torch or loading a dataset, so a bad value costs a line, not a minute.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from branchserve.repo.manifest import ResizePolicy

Preset = Literal["progressive", "seed-weights", "joint", "unbranched"]
Weighting = Literal["equal", "seed", "increasing", "decreasing"]
Schedule = Literal["joint", "backbone-first", "joint+finetune", "exits-only"]
Objective = Literal["ce", "ce+distill"]
FinetuneScope = Literal["after-last-branch", "all"]
Optimizer = Literal["sgd", "adamw"]


def comma_list(text: str, kind: type[int] | type[float], what: str) -> list[Any]:
    """`1,3,5` as numbers; a ValueError that shows the expected form otherwise."""
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"expected {what}, got {text!r}") from None


def _positions(value: Any) -> Any:
    if isinstance(value, str) and value != "equidistant":
        return comma_list(value, int, "'equidistant' or block indices such as 1,3,5,7")
    return value


class RegimeConfig(BaseModel):
    """Every knob of a run. Presets fill these; flags override single fields.

    `positions` and `weighting` also take the command line's comma-separated text, and a list of
    positions without `branches` sets the number of exits.
    """

    model_config = ConfigDict(extra="forbid")

    branches: int = Field(4, ge=1, description="number of exits, the last one after the last block")
    positions: Literal["equidistant"] | list[int] = Field(
        "equidistant", description="'equidistant' or the block after which each exit sits"
    )
    weighting: Weighting | list[float] = Field("equal", description="per-exit loss weights, by name or as numbers")
    objective: Objective = Field("ce", description="ce+distill: early exits also match the final exit's output")
    distill_temperature: float = Field(3.0, gt=0, description="softening of the final exit's output under ce+distill")
    distill_alpha: float = Field(0.5, ge=0, le=1, description="share of the distillation term in an early exit's loss")
    schedule: Schedule = Field("joint+finetune", description="order of the phases that train the exits")
    finetune_scope: FinetuneScope = Field("after-last-branch", description="what the final-exit finetune trains")
    epochs: int = Field(10, ge=1, description="total epochs, all phases together: the budget every preset shares")
    finetune_epochs: int = Field(2, ge=0, description="final-exit-only epochs at the end of joint+finetune")
    refit_epochs: int = Field(1, ge=0, description="branch-head refit epochs after finetune_scope=all")
    backbone_epochs: int = Field(3, ge=0, description="final-exit-only epochs at the start of backbone-first")
    optimizer: Optimizer = Field("sgd", description="SGD with Nesterov momentum 0.9, or AdamW")
    lr: float = Field(0.1, gt=0, description="peak learning rate of each phase's cosine schedule")
    finetune_lr: float = Field(0.01, gt=0, description="peak learning rate of the finetune and refit phases")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay")
    batch_size: int = Field(128, ge=1, description="training batch size")
    seed: int = Field(0, description="initial weights, batch order and augmentation")

    @model_validator(mode="before")
    @classmethod
    def _branches_from_positions(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("branches") is None:
            try:
                positions = _positions(values.get("positions", "equidistant"))
            except ValueError:
                return values  # the field's own validator reports it
            if isinstance(positions, list):
                return {**values, "branches": len(positions)}
        return values

    @field_validator("positions", mode="before")
    @classmethod
    def _positions_text(cls, value: Any) -> Any:
        return _positions(value)

    @field_validator("weighting", mode="before")
    @classmethod
    def _weighting_text(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in get_args(Weighting):
            return comma_list(value, float, f"one of {', '.join(get_args(Weighting))} or weights such as 1,1,1,2")
        return value

    @model_validator(mode="after")
    def _check(self) -> RegimeConfig:
        if isinstance(self.positions, list) and len(self.positions) != self.branches:
            raise ValueError(f"{len(self.positions)} positions given for {self.branches} branches")
        try:
            loss_weights(self.weighting, self.branches)
        except ValueError as e:
            raise ValueError(f"weighting: {e}") from None
        if self.schedule == "joint+finetune" and self.branches > 1:
            self._check_finetune()
        if self.schedule == "exits-only" and (
            self.branches < 2 or not sum(loss_weights(self.weighting, self.branches)[:-1])
        ):
            raise ValueError(
                "exits-only trains the early exits of a trained backbone: it needs 2 or more exits "
                "and a positive weight on one before the last"
            )
        if self.schedule == "backbone-first" and not 0 < self.backbone_epochs < self.epochs:
            raise ValueError(
                f"backbone-first needs 0 < backbone_epochs ({self.backbone_epochs}) < epochs ({self.epochs}): "
                "raise --epochs, set --backbone-epochs in between or use --schedule joint"
            )
        return self

    def _check_finetune(self) -> None:
        refit = self.finetune_scope == "all"
        tail = self.finetune_epochs + (self.refit_epochs if refit else 0)
        what = "finetune_epochs + refit_epochs" if refit else "finetune_epochs"
        if tail == 0:
            raise ValueError(f"joint+finetune needs {what} > 0: raise --finetune-epochs or use --schedule joint")
        if tail >= self.epochs:
            lower = "--finetune-epochs or --refit-epochs" if refit else "--finetune-epochs"
            raise ValueError(
                f"joint+finetune needs {what} ({tail}) < epochs ({self.epochs}): "
                f"raise --epochs, lower {lower} or use --schedule joint"
            )


DEFAULT_PRESET: Preset = "progressive"
PRESETS: dict[Preset, dict[str, Any]] = {
    "progressive": {"weighting": "equal", "positions": "equidistant", "schedule": "joint+finetune"},
    "seed-weights": {"weighting": "seed", "positions": "equidistant", "schedule": "joint+finetune"},
    "joint": {"weighting": "equal", "positions": "equidistant", "schedule": "joint"},
    "unbranched": {"branches": 1, "weighting": "equal", "schedule": "joint"},
}


def loss_weights(weighting: Weighting | list[float], n: int) -> list[float]:
    """Per-exit weights normalised to sum to 1, so the learning rate means the same for every choice."""
    if isinstance(weighting, list):
        if len(weighting) != n:
            raise ValueError(f"{len(weighting)} weights given for {n} branches")
        raw = list(weighting)
    elif weighting == "equal":
        raw = [1.0] * n
    elif weighting == "seed":
        raw = [1.0] * (n - 1) + [2.0]
    elif weighting == "increasing":
        raw = [float(k + 1) for k in range(n)]
    else:
        raw = [float(n - k) for k in range(n)]
    total = sum(raw)
    if total <= 0 or any(w < 0 for w in raw):
        raise ValueError(f"loss weights must be non-negative with a positive sum, got {raw}")
    return [w / total for w in raw]


@dataclass(frozen=True)
class ArchConfig:
    """Backbone shape: one (width, stride) pair per block, after a stem of `stem_width` channels,
    and the blocks after which the exits sit (the last one after the last block)."""

    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    stem_width: int = 16
    blocks: tuple[tuple[int, int], ...] = ((24, 2), (24, 1), (48, 2), (48, 1), (96, 2), (96, 1), (96, 1), (96, 1))
    exits: tuple[int, ...] = (1, 3, 5, 7)
    head_conv_width: int = 48
    head_pool: int = 4
    stem_stride: int = 1
    """1, or 2 (a strided stem convolution), or 4 (then a 3×3 max-pool of stride 2 as well)."""

    def checked(self) -> ArchConfig:
        """Itself, if a model can be built from it: exits at increasing blocks, the last after the last block.
        (A base shape may carry any exits: `arch_for` sets them from the regime.)"""
        if not self.exits or self.exits[-1] != len(self.blocks) - 1:
            raise ValueError(f"the last exit must sit after the last block, {len(self.blocks) - 1}, got {self.exits}")
        if list(self.exits) != sorted(set(self.exits)) or self.exits[0] < 0:
            raise ValueError(f"exit positions must be increasing block indices, got {self.exits}")
        if self.stem_stride not in (1, 2, 4):
            raise ValueError(f"the stem's stride must be 1, 2 or 4, got {self.stem_stride}")
        return self

    def scaled(self) -> ArchConfig:
        """For inputs above 32 pixels a strided stem, so the blocks start at 32 pixels or less
        (64 → 32, 128 → 32, 224 → 56); up to 32 pixels, the stem keeps the resolution."""
        return replace(self, stem_stride=next((s for s in (1, 2) if self.image_size <= 32 * s), 4))

    def with_widths(self, widths: Sequence[int]) -> ArchConfig:
        """The same backbone with other block widths (strides unchanged)."""
        if len(widths) != len(self.blocks) or min(widths) < 1:
            raise ValueError(f"need {len(self.blocks)} positive block widths, got {list(widths)}")
        return replace(self, blocks=tuple((w, stride) for w, (_, stride) in zip(widths, self.blocks, strict=True)))


def equidistant_positions(num_blocks: int, num_exits: int) -> tuple[int, ...]:
    """Exit k sits after block round((k+1)·B/N) − 1, so the last exit is always the last block."""
    if not 1 <= num_exits <= num_blocks:
        raise ValueError(f"need 1..{num_blocks} exits for {num_blocks} blocks, got {num_exits}")
    return tuple(round((k + 1) * num_blocks / num_exits) - 1 for k in range(num_exits))


def arch_for(cfg: RegimeConfig, base: ArchConfig) -> ArchConfig:
    """`base` with the exits the regime asks for; a ValueError if they do not fit its blocks."""
    if isinstance(cfg.positions, list):
        return replace(base, exits=tuple(cfg.positions)).checked()
    return replace(base, exits=equidistant_positions(len(base.blocks), cfg.branches)).checked()


Color = Literal["grey", "rgb"]
BadImages = Literal["skip", "fail"]
MAX_AUTO_SIZE = 224


class DataSource(BaseModel):
    """Where a dataset's images come from, how they become inputs and the seed that splits them: a
    run records it, so export loads the very same splits again."""

    kind: Literal["fashion-mnist", "image-folder"]
    path: Path
    split_seed: int = 0
    image_size: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="input height and width (default: 28 for Fashion-MNIST; for a folder, its images' median "
        f"shorter side, at most {MAX_AUTO_SIZE})",
    )
    color: Color | None = Field(
        None, description="(default: grey for Fashion-MNIST; for a folder, rgb if any image is stored in colour)"
    )
    resize: ResizePolicy = Field(
        "stretch",
        description="stretch to the input size, or resize the shorter side to fit and cut out the centre "
        "(default stretch)",
    )
    bad_images: BadImages = Field(
        "skip", description="an image that cannot be read: leave it out and count it, or stop (default skip)"
    )


class AnalysisSettings(BaseModel):
    """What the metrics were computed on; stored with every result so numbers can be compared."""

    probe_train: int = Field(5000, ge=2, description="validation images that train each probe")
    probe_test: int = Field(5000, ge=1, description="further validation images that score it")
    pool: int = Field(
        1, ge=1, description="block outputs are average-pooled to pool×pool and flattened; 1 pools globally"
    )
    probe_l2: float = Field(1e-3, ge=0, description="L2 penalty of the probe's logistic regression")
    probe_iters: int = Field(200, ge=1, description="L-BFGS iterations per probe")


GridValue = str | int | float | list[int] | list[float]


class StudySpec(BaseModel):
    """Everything that decides a study's numbers; a rerun into the same folder must match it.

    Cells come from three places, in this order and without repeats: the product of `grid`'s axes;
    with `vary`, the base regime itself and then each value of each axis alone (one factor at a
    time); and `extra`, cells named in full. Every cell is trained once per seed in `seeds`.
    """

    grid: dict[str, list[GridValue]] = Field({}, description="values of each regime field to cross")
    vary: dict[str, list[GridValue]] = Field({}, description="values of each regime field to try one at a time")
    extra: list[dict[str, GridValue]] = Field([], description="further cells, each a set of regime fields")
    fixed: dict[str, GridValue] = Field({}, description="regime fields every cell shares, over the preset's")
    preset: Preset = Field(DEFAULT_PRESET, description="regime every cell starts from")
    epochs: int = Field(6, ge=1, description="epoch budget of every cell")
    seeds: list[int] = Field([0], min_length=1, description="every cell is trained once per seed")
    train_limit: int | None = Field(None, ge=1, description="train every cell on the first N training images")
    cost_budget: float = Field(0.5, gt=0, description="expected-cost budget as a share of the unbranched model's MACs")
    analysis: AnalysisSettings = AnalysisSettings(probe_train=2500, probe_test=2500)

    @model_validator(mode="after")
    def _some_cells(self) -> StudySpec:
        if not (self.grid or self.vary or self.extra):
            raise ValueError("the study has no cells: give --grid, --vary or --cell")
        return self

    def cells(self) -> list[dict[str, GridValue]]:
        keys = list(self.grid)
        crossed = [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.grid.values())]
        base = self.config({}, self.seeds[0]) if self.vary else None
        changes = [{k: v} for k, vs in self.vary.items() for v in vs]
        one_at_a_time = [{}, *(c for c in changes if self.config(c, self.seeds[0]) != base)] if self.vary else []
        unique: dict[str, dict[str, GridValue]] = {}
        for cell in [*(crossed if self.grid else []), *one_at_a_time, *self.extra]:
            unique.setdefault(cell_name(cell), cell)
        return list(unique.values())

    def command(self, out: Path) -> str:
        """The `branchserve study` command line that reproduces this study."""
        a = self.analysis
        return (
            "branchserve study"
            + (f" --grid {_axes(self.grid)}" if self.grid else "")
            + (f" --vary {_axes(self.vary)}" if self.vary else "")
            + "".join(f" --cell {_axes({k: [v] for k, v in c.items()})}" for c in self.extra)
            + (f" --set {_axes({k: [v] for k, v in self.fixed.items()})}" if self.fixed else "")
            + f" --preset {self.preset} --epochs {self.epochs} --seeds {','.join(map(str, self.seeds))}"
            + (f" --train-limit {self.train_limit}" if self.train_limit else "")
            + f" --cost-budget {self.cost_budget:g} --probe-train {a.probe_train} --probe-test {a.probe_test}"
            + (f" --pool {a.pool}" if a.pool != 1 else "")
            + f" --out {out}"
        )

    def config(self, cell: dict[str, GridValue], seed: int) -> RegimeConfig:
        return RegimeConfig(**{**PRESETS[self.preset], "epochs": self.epochs, **self.fixed, "seed": seed, **cell})


def _axes(axes: dict[str, list[GridValue]]) -> str:
    return " ".join(f"{k}={','.join(_show(v, ':') for v in vs)}" for k, vs in axes.items())


def parse_grid(items: list[str]) -> dict[str, list[GridValue]]:
    """`key=v1,v2` per axis; a list value (positions, weights) joins its numbers with ':', e.g. 1:3:5:7."""
    grid: dict[str, list[GridValue]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.replace("-", "_")
        if not sep or not values:
            raise ValueError(f"grid axis {item!r} is not key=value[,value...]")
        if key not in RegimeConfig.model_fields:
            raise ValueError(f"{key!r} is not a regime field; choose from {', '.join(RegimeConfig.model_fields)}")
        grid[key] = [_value(v) for v in values.split(",")]
    if not grid:
        raise ValueError("the grid is empty")
    return grid


def parse_cell(items: list[str]) -> dict[str, GridValue]:
    """`key=value` per regime field, one value each: a cell, or the fields every cell shares."""
    axes = parse_grid(items)
    several = [k for k, vs in axes.items() if len(vs) != 1]
    if several:
        raise ValueError(f"one value per field here, got several for {', '.join(several)}")
    return {k: vs[0] for k, vs in axes.items()}


def _value(text: str) -> GridValue:
    if ":" in text:
        numbers = [float(v) for v in text.split(":")]
        return [int(v) for v in numbers] if all(v.is_integer() for v in numbers) else numbers
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def cell_name(cell: dict[str, GridValue]) -> str:
    """A folder-safe name: weighting-equal_schedule-joint; the base regime itself is `base`."""
    return "_".join(f"{k}-{_show(v, '-')}" for k, v in cell.items()) or "base"


def _show(v: GridValue, sep: str) -> str:
    return sep.join(f"{x:g}" for x in v) if isinstance(v, list) else str(v)
