"""`branchserve train`, `export`, `analyze` and `study`: their flags and their one-line errors.

Importing this module imports no torch and reads no data: a command checks its flags against
`training.config` first, then imports torch and loads the dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, get_args

from pydantic import BaseModel, ValidationError

from branchserve.fmnist import ENV_VAR, SYSTEM_DIR, DataError, fmnist_dir
from branchserve.repo.manifest import ConfidenceKind, InputSpec, ResizePolicy
from branchserve.training.backbones.spec import BUILT_IN, NAMED, BackboneSpec
from branchserve.training.config import (
    DEFAULT_PRESET,
    PRESETS,
    AnalysisSettings,
    ArchConfig,
    BadImages,
    Color,
    DataSource,
    FinetuneScope,
    Objective,
    Optimizer,
    Preset,
    RegimeConfig,
    Schedule,
    StudySpec,
    Weighting,
    arch_for,
    comma_list,
    parse_cell,
    parse_grid,
)

QUICK_REGIME = {"epochs": 3, "finetune_epochs": 1, "refit_epochs": 1, "backbone_epochs": 1}
QUICK_TRAIN_LIMIT, QUICK_EVAL_LIMIT = 5000, 1000
"""`train --quick`: a trial of about a minute on 2 cores that still runs every phase of the preset."""
DEFAULT_REPO = Path("models")  # where `branchserve serve` looks by default
DEFAULT_WORKERS = min(2, os.cpu_count() or 1)


def fail(command: str, message: object) -> NoReturn:
    sys.exit(f"branchserve {command}: {message}")


def validation_message(e: ValidationError) -> str:
    """pydantic's errors as "field: message; ...", with a validator's own message unprefixed."""
    parts = []
    for error in e.errors():
        where = ".".join(str(p) for p in error["loc"])
        what = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
        parts.append(f"{where}: {what}" if where else what)
    return "; ".join(parts)


def given(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The flags set on the command line that are fields of `model` (unset flags are None)."""
    return {k: v for k, v in vars(args).items() if k in model.model_fields and v is not None}


def data_source(args: argparse.Namespace, split_seed: int, **reading: Any) -> DataSource:
    """Fashion-MNIST or the folder the flags name; `reading`: the image settings of DataSource."""
    if args.data_dir:
        return DataSource(kind="image-folder", path=args.data_dir, split_seed=split_seed, **reading)
    return DataSource(kind="fashion-mnist", path=args.fmnist_dir or fmnist_dir(), split_seed=split_seed, **reading)


def recorded_input(run: Path) -> InputSpec | None:
    """The input spec a run was trained with, as its summary records it (None before it did)."""
    summary = run / "summary.json"
    spec = json.loads(summary.read_text()).get("input") if summary.is_file() else None
    return InputSpec.model_validate(spec) if spec else None


# train


def regime(args: argparse.Namespace) -> tuple[RegimeConfig, list[int] | None]:
    """The run's regime and block widths from the flags, checked as the model will be built."""
    quick = QUICK_REGIME if args.quick else {}
    flags = given(args, RegimeConfig)
    if args.freeze_backbone:
        if not args.init:
            fail("train", "--freeze-backbone keeps a trained backbone as it is: name it with --init")
        if flags.get("schedule", "exits-only") != "exits-only":
            fail("train", "--freeze-backbone trains the exits only (schedule exits-only): drop --schedule")
        flags["schedule"] = "exits-only"
    if args.branch_after:
        named = len(args.branch_after.split(",")) + 1  # the named cuts, then the final exit
        if flags.setdefault("branches", named) != named:
            fail("train", f"--branch-after names {named - 1} exits before the final one: drop --branches")
    try:
        cfg = RegimeConfig(**{**PRESETS[args.preset], **quick, **flags})
    except ValidationError as e:
        fail("train", validation_message(e))
    if args.backbone != BUILT_IN:
        if args.widths or isinstance(cfg.positions, list):
            fail(
                "train",
                f"--widths and --positions shape the built-in backbone; --backbone {args.backbone} takes --branch-after",
            )
        return cfg, None
    try:
        widths = comma_list(args.widths, int, "block widths such as 32,32,48,48,96,96,96,96") if args.widths else None
        base = ArchConfig().with_widths(widths) if widths else ArchConfig()
    except ValueError as e:
        fail("train", f"widths: {e}")
    try:
        arch_for(cfg, base)
    except ValueError as e:
        fail("train", f"positions: {e}")
    return cfg, widths


def backbone_choice(args: argparse.Namespace) -> BackboneSpec:
    try:
        spec = BackboneSpec(name=args.backbone, branch_after=args.branch_after)
    except ValidationError as e:
        fail("train", validation_message(e))
    if args.init and not (args.init.is_file() or (args.init / "checkpoint.pt").is_file()):
        fail("train", f"--init {args.init}: not found; give a state-dict file or a run folder holding checkpoint.pt")
    return spec


def train_source(args: argparse.Namespace) -> DataSource:
    reading = {"image_size": args.image_size, "color": args.color, "resize": args.resize, "bad_images": args.bad_images}
    try:
        return data_source(args, args.split_seed, **{k: v for k, v in reading.items() if v is not None})
    except ValidationError as e:
        fail("train", validation_message(e))


def _train(args: argparse.Namespace) -> None:
    spec = backbone_choice(args)
    cfg, widths = regime(args)
    source = train_source(args)
    train_limit = args.train_limit or (QUICK_TRAIN_LIMIT if args.quick else None)
    eval_limit = args.eval_limit or (QUICK_EVAL_LIMIT if args.quick else None)

    from branchserve.training.backbones.imported import BackboneError
    from branchserve.training.sources import load_data
    from branchserve.training.train import ResumeError, train

    try:
        data = load_data(source, workers=args.workers)
        print(f"input: {describe_input(data.input)}", file=sys.stderr)
        base = None
        if args.head_conv_width is not None:  # the data's shape, with the heads asked for
            channels, size, _ = data.input.shape
            base = ArchConfig(channels, size, len(data.labels), head_conv_width=args.head_conv_width).scaled()
        summary = train(
            cfg,
            data,
            args.out,
            base,
            widths=widths,
            resume=args.resume,
            threads=args.threads,
            train_limit=train_limit,
            eval_limit=eval_limit,
            backbone=spec,
            init=args.init,
        )
    except (DataError, ResumeError, BackboneError) as e:
        fail("train", e)
    scores = {k: summary[k] for k in ("val_accuracy", "test_accuracy", "wall_time_s")}
    limits = {k: v for k, v in (("train_limit", train_limit), ("eval_limit", eval_limit)) if v}
    moved = {"final_exit_moved": summary["init"]["final_exit_val"]} if "init" in summary else {}
    print(json.dumps({**scores, **limits, **moved}))
    print(f"next: branchserve export {args.out} --name <model name>")


def describe_input(spec: InputSpec) -> str:
    _, height, width = spec.shape
    numbers = ", ".join(f"{m:.3f}/{s:.3f}" for m, s in zip(spec.mean, spec.std, strict=True))
    return f"{width}×{height} {spec.color_mode} ({spec.resize}), per-channel mean/std {numbers}"


def _count(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _default(name: str) -> str:
    """A regime field's default, and the presets that set it otherwise."""
    default = RegimeConfig.model_fields[name].default
    differing = [f"{p}: {v[name]}" for p, v in PRESETS.items() if name in v and v[name] != default]
    return f"default {default}" + "".join(f", {d}" for d in differing)


def _regime_flag(p: argparse.ArgumentParser, name: str, what: str | None = None, **kwargs: Any) -> None:
    description = what or RegimeConfig.model_fields[name].description
    p.add_argument(f"--{name.replace('_', '-')}", help=f"{description} ({_default(name)})", **kwargs)


FMNIST_DEFAULT = f"${ENV_VAR}, else {SYSTEM_DIR}"


def _data_flags(p: argparse.ArgumentParser, folder_default: str, fmnist_default: str = FMNIST_DEFAULT) -> None:
    p.add_argument(
        "--data-dir", type=Path, help=f"a folder of images, one sub-folder per class (default: {folder_default})"
    )
    p.add_argument("--fmnist-dir", type=Path, help=f"Fashion-MNIST's IDX files (default: {fmnist_default})")


def _reading_flags(p: argparse.ArgumentParser) -> None:
    """How images become inputs: DataSource's fields, described there."""
    fields = DataSource.model_fields
    p.add_argument("--image-size", type=int, help=fields["image_size"].description)
    p.add_argument("--color", choices=get_args(Color), help=f"colour of the input {fields['color'].description}")
    p.add_argument("--resize", choices=get_args(ResizePolicy), help=fields["resize"].description)
    p.add_argument("--bad-images", choices=get_args(BadImages), help=fields["bad_images"].description)
    _workers_flag(p)


def _workers_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help=f"processes that decode a folder's images while the model trains; 0 decodes in the main process "
        f"(default {DEFAULT_WORKERS})",
    )


def _backbone_flags(p: argparse.ArgumentParser) -> None:
    fields = BackboneSpec.model_fields
    named = "; ".join(f"{name}: {what}" for name, what in NAMED.items())
    p.add_argument(
        "--backbone",
        default=BUILT_IN,
        help=f"{fields['name'].description} ({named}; a factory is called with whichever of num_classes, "
        f"in_channels, image_size it takes) (default {BUILT_IN})",
    )
    p.add_argument(
        "--branch-after",
        help="modules after which exits sit, comma-separated in the order they run, e.g. layer1,layer2,layer3; "
        "sets --branches to their number + 1 (default: --branches exits spread evenly over the backbone's MACs)",
    )
    p.add_argument(
        "--init",
        type=Path,
        help="start from these backbone weights: a state-dict file (torchvision's keys for resnet18) or a run "
        "folder, e.g. an unbranched run (default: random weights)",
    )
    p.add_argument(
        "--freeze-backbone",
        action="store_true",
        help="train the early exits only, the --init backbone and its final exit unchanged (schedule exits-only) "
        "(default off)",
    )


def _register_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    t = sub.add_parser("train", help="train a branched (or unbranched) classifier")
    t.add_argument("--out", type=Path, required=True, help="run folder: checkpoint.pt, log.jsonl, summary.json")
    t.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=get_args(Preset),
        help=f"regime to start from; the flags below override single fields (default {DEFAULT_PRESET})",
    )
    t.add_argument(
        "--quick",
        action="store_true",
        help=f"a trial of about a minute: train on {QUICK_TRAIN_LIMIT} images, score on {QUICK_EVAL_LIMIT}, "
        f"{QUICK_REGIME['epochs']} epochs (1 of finetune); flags given still win (default off)",
    )
    _data_flags(t, "Fashion-MNIST")
    _reading_flags(t)
    t.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation(/test) split (default 0)")
    t.add_argument("--train-limit", type=_count, help="train on the first N training images only (default all)")
    t.add_argument(
        "--eval-limit", type=_count, help="score validation and test on their first N images only (default all)"
    )
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint (default off)")
    t.add_argument("--threads", type=_count, help="torch threads (default: torch's choice, one per core)")
    default_widths = ",".join(str(w) for w, _ in ArchConfig().blocks)
    t.add_argument(
        "--widths",
        help=f"channels of each backbone block (default {default_widths}); multiples of 16 fill onnxruntime's "
        "blocked layout on AVX-512 CPUs, which computes 24 channels as 32",
    )
    _backbone_flags(t)
    t.add_argument(
        "--head-conv-width",
        type=int,
        choices=range(0, 1025),
        metavar="N",
        help=f"channels of the 1×1 conv that opens each exit head; 0 for none: pooling and one linear layer, "
        f"cheaper at 14×14 exits (default {ArchConfig().head_conv_width})",
    )
    _regime_flag(t, "branches", type=int)
    _regime_flag(
        t, "positions", what="'equidistant', or the block after each exit such as 2,5,7, which also sets --branches"
    )
    _regime_flag(t, "weighting", what=f"per-exit loss weights: {', '.join(get_args(Weighting))}, or e.g. 1,1,1,2")
    _regime_flag(t, "objective", choices=get_args(Objective))
    _regime_flag(t, "distill_temperature", type=float)
    _regime_flag(t, "distill_alpha", type=float)
    _regime_flag(t, "schedule", choices=get_args(Schedule))
    _regime_flag(t, "finetune_scope", choices=get_args(FinetuneScope))
    for name in ("epochs", "finetune_epochs", "refit_epochs", "backbone_epochs"):
        _regime_flag(t, name, type=int)
    _regime_flag(t, "optimizer", choices=get_args(Optimizer))
    for name in ("lr", "finetune_lr", "weight_decay"):
        _regime_flag(t, name, type=float)
    _regime_flag(t, "batch_size", type=int)
    _regime_flag(t, "seed", type=int)
    t.set_defaults(func=_train)


# export


def export_source(args: argparse.Namespace) -> DataSource:
    """The data the run recorded, unless --data-dir or --fmnist-dir point elsewhere; --split-seed overrides its seed."""
    from branchserve.training.export import ExportError
    from branchserve.training.export.publish import recorded_source

    recorded = recorded_source(args.run)
    split_seed = args.split_seed if args.split_seed is not None else recorded.split_seed if recorded else 0
    if args.data_dir or args.fmnist_dir:
        reading = recorded.model_dump(include={"image_size", "color", "resize", "bad_images"}) if recorded else {}
        return data_source(args, split_seed, **reading)
    if recorded is None:
        raise ExportError(f"{args.run} records no data to load again: pass --data-dir or --fmnist-dir")
    return recorded.model_copy(update={"split_seed": split_seed})


def serving_hint(repo: Path, version_dir: Path) -> str:
    """Which version of the model `branchserve serve` will pick, by the server's own rule."""
    from branchserve.repo.loading import latest_version

    name, latest = version_dir.parent.name, latest_version(version_dir.parent)
    serve = "branchserve serve" + ("" if repo == DEFAULT_REPO else f" --repository {repo}")
    if latest == version_dir:
        return f"{name}/{latest.name} is now the latest version of {name}: `{serve}` will serve it"
    return f"{name}/{version_dir.name} is not the latest version of {name}: `{serve}` will serve {name}/{latest.name}"


def _export(args: argparse.Namespace) -> None:
    from branchserve.repo.frontier import SearchSettings
    from branchserve.repo.loading import load_version
    from branchserve.repo.manifest import RepositoryError
    from branchserve.repo.report import print_summary
    from branchserve.training.backbones.imported import BackboneError
    from branchserve.training.export import ExportError
    from branchserve.training.export.calibration import ExportSettings
    from branchserve.training.export.publish import export_run
    from branchserve.training.sources import load_data

    settings = ExportSettings(
        confidence=args.confidence,
        search=SearchSettings(holdout_seed=args.holdout_seed),
        default_tolerance=args.tolerance_pp / 100,
        batch_sizes=tuple(args.batch_sizes),
        latency_runs=args.runs,
    )
    try:
        data = load_data(export_source(args), recorded_input(args.run), workers=args.workers)
        version_dir = export_run(args.run, args.repo, args.name, data, args.version, settings)
    except (DataError, ExportError, RepositoryError, FileNotFoundError, BackboneError) as e:
        fail("export", e)
    print(f"exported {version_dir}")
    print_summary(load_version(version_dir))
    print(serving_hint(args.repo, version_dir))


def _ints(text: str) -> list[int]:
    try:
        return comma_list(text, int, "integers such as 1,8,64")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _register_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    e = sub.add_parser("export", help="export a trained run as staged ONNX with calibration into a model repository")
    e.add_argument("run", type=Path, help="run folder with checkpoint.pt and summary.json")
    e.add_argument("--name", required=True, help="model name: the version goes to <repo>/<name>/<version>/")
    e.add_argument("--repo", type=Path, default=DEFAULT_REPO, help=f"model repository root (default {DEFAULT_REPO})")
    e.add_argument("--version", type=_count, help="version number (default: the next free one)")
    recorded = "the data the run recorded in its summary.json"
    _data_flags(e, recorded, recorded)
    e.add_argument("--split-seed", type=int, help="the train/validation split seed (default: the run's)")
    _workers_flag(e)
    e.add_argument(
        "--confidence",
        choices=get_args(ConfidenceKind),
        default="max_softmax",
        help="confidence measure of an exit (default max_softmax)",
    )
    e.add_argument(
        "--holdout-seed", type=int, default=0, help="seed of the validation halves, propose / keep (default 0)"
    )
    e.add_argument(
        "--tolerance-pp",
        type=float,
        default=0.3,
        help="default operating point: the cheapest within this many points of the final exit's val accuracy "
        "(default 0.3)",
    )
    e.add_argument(
        "--batch-sizes", type=_ints, default=[1, 8, 64], help="batch sizes to time, 1 required (default 1,8,64)"
    )
    e.add_argument(
        "--runs", type=_count, default=2000, help="timed runs at batch 1, fewer for larger batches (default 2000)"
    )
    e.set_defaults(func=_export)


# analyze and study


def _analyze(args: argparse.Namespace) -> None:
    try:
        settings = AnalysisSettings(**given(args, AnalysisSettings))
    except ValidationError as e:
        fail("analyze", validation_message(e))

    import torch

    from branchserve.training.analysis import compare_runs
    from branchserve.training.report import write_analysis
    from branchserve.training.sources import load_data

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = load_data(data_source(args, split_seed=0), recorded_input(args.run), workers=args.workers)
        probes = data.val.head(settings.probe_train + settings.probe_test).loaded()
        analysis = compare_runs(args.run, probes, settings, args.against)
    except (DataError, FileNotFoundError, ValueError) as e:
        fail("analyze", e)
    print(write_analysis(analysis, args.out))


def _study(args: argparse.Namespace) -> None:
    analysis_defaults = StudySpec.model_fields["analysis"].default.model_dump()
    try:
        analysis = AnalysisSettings(**{**analysis_defaults, **given(args, AnalysisSettings)})
        cells = {
            "grid": parse_grid(args.grid) if args.grid else {},
            "vary": parse_grid(args.vary) if args.vary else {},
            "extra": [parse_cell(c) for c in args.cell or []],
            "fixed": parse_cell(args.set) if args.set else {},
        }
        spec = StudySpec(**{**given(args, StudySpec), **cells, "analysis": analysis})
        for cell in spec.cells():  # every cell's regime, before the first one trains
            for seed in spec.seeds:
                spec.config(cell, seed)
    except ValidationError as e:
        fail("study", validation_message(e))
    except ValueError as e:
        fail("study", e)

    from branchserve.training.report import write_study
    from branchserve.training.sources import load_data
    from branchserve.training.study import run_study

    try:
        data = load_data(data_source(args, split_seed=0), workers=args.workers)
        data = replace(data, val=data.val.loaded(), test=data.test.loaded())  # scored whole, and often
        results = run_study(
            spec,
            data,
            args.out,
            threads=args.threads,
            after_cell=lambda done: write_study(done, spec, args.out),
            train_missing=not args.report_only,
        )
    except (DataError, ValueError) as e:
        fail("study", e)
    print(write_study(results, spec, args.out))


def _field_flag(p: argparse.ArgumentParser, model: type[BaseModel], name: str, default: object, **kwargs: Any) -> None:
    description = model.model_fields[name].description
    p.add_argument(f"--{name.replace('_', '-')}", help=f"{description} (default {default})", **kwargs)


def _analysis_flags(p: argparse.ArgumentParser, defaults: AnalysisSettings) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for the report, its JSON and PNG plots")
    _data_flags(p, "Fashion-MNIST")
    _workers_flag(p)
    p.add_argument("--threads", type=_count, help="torch threads (default: torch's choice, one per core)")
    for name in ("probe_train", "probe_test", "pool"):
        _field_flag(p, AnalysisSettings, name, getattr(defaults, name), type=int)


def _register_analysis(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = sub.add_parser("analyze", help="layer-wise probe accuracy, class separation and CKA of a trained run")
    a.add_argument("run", type=Path, help="run folder with checkpoint.pt")
    a.add_argument(
        "--against", type=Path, help="a second run to compare with, e.g. the unbranched twin (default: none)"
    )
    _analysis_flags(a, AnalysisSettings())
    a.set_defaults(func=_analyze)

    s = sub.add_parser("study", help="train and score training regimes over seeds (resumable)")
    s.add_argument(
        "--grid",
        nargs="+",
        metavar="KEY=V1,V2",
        help="axes to cross, one per regime field, e.g. weighting=equal,seed schedule=joint,joint+finetune; "
        "list values join numbers with ':', e.g. positions=equidistant,1:3:5:7 (default none)",
    )
    s.add_argument(
        "--vary",
        nargs="+",
        metavar="KEY=V1,V2",
        help="axes to try one at a time around the preset: the preset's own cell, then each value alone (default none)",
    )
    s.add_argument(
        "--cell",
        nargs="+",
        action="append",
        metavar="KEY=V",
        help="one more cell, e.g. --cell weighting=decreasing schedule=joint; repeat for more (default none)",
    )
    s.add_argument(
        "--set",
        nargs="+",
        metavar="KEY=V",
        help="regime fields every cell shares, e.g. finetune-epochs=1 (default none)",
    )
    spec = StudySpec.model_fields
    s.add_argument(
        "--preset", choices=get_args(Preset), help=f"{spec['preset'].description} (default {DEFAULT_PRESET})"
    )
    for name, kind in (("epochs", int), ("cost_budget", float)):
        _field_flag(s, StudySpec, name, spec[name].default, type=kind)
    s.add_argument("--seeds", type=_ints, help="every cell is trained once per seed, e.g. 0,1,2 (default 0)")
    s.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the report of the runs already finished (default off)",
    )
    _field_flag(s, StudySpec, "train_limit", "all", type=_count)
    _analysis_flags(s, spec["analysis"].default)
    s.set_defaults(func=_study)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_train(sub)
    _register_export(sub)
    _register_analysis(sub)
