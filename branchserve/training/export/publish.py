"""Publishing a version into a model repository: the next free number, and a folder that appears
complete, checked the way the server loads it, or not at all."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from branchserve.repo.loading import load_version
from branchserve.repo.manifest import MANIFEST_FILE
from branchserve.training.config import DataSource
from branchserve.training.data import Dataset
from branchserve.training.export import ExportError
from branchserve.training.export.assemble import assemble_version, load_run, read_summary
from branchserve.training.export.calibration import ExportSettings


def export_run(
    run_dir: Path,
    repo: Path,
    name: str,
    data: Dataset,
    version: int | None = None,
    settings: ExportSettings | None = None,
    progress: bool = True,
) -> Path:
    """Export `run_dir` to `repo/name/version/` (default: the next free version, default settings)
    and return that folder.

    `data` must be the dataset the run was trained on: its validation split calibrates the exits
    and the frontier; its test split is scored and reported, never used for a choice.
    """
    run = load_run(run_dir)
    trained_on = {k: run.summary["data"].get(k) for k in data.describe()}
    if run.labels != data.labels or run.input != data.input or trained_on != data.describe():
        raise ExportError(
            f"{run_dir} was trained on {trained_on} with labels {run.labels}, "
            f"not on the data given ({data.describe()}, labels {data.labels})"
        )
    model_dir = repo / name
    version = version or next_version(model_dir)
    with version_folder(model_dir, version) as work:
        manifest = assemble_version(run, name, version, data, work, settings or ExportSettings(), progress)
        (work / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    return model_dir / str(version)


def recorded_source(run_dir: Path) -> DataSource | None:
    """The data the run was trained on, as its summary records it (None for data made in memory)."""
    source = read_summary(run_dir)["data"].get("source")
    return DataSource.model_validate(source) if source else None


def next_version(model_dir: Path) -> int:
    existing = (
        [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    )
    return max(existing, default=0) + 1


@contextmanager
def version_folder(model_dir: Path, version: int) -> Iterator[Path]:
    """A work folder (`.export-<v>`, which the server ignores) that becomes `model_dir/<v>` when the
    block succeeds and the server would load it; on any failure, nothing is left behind."""
    final = model_dir / str(version)
    if final.exists():
        raise ExportError(f"{final} already exists; pick another --version")
    work = model_dir / f".export-{version}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
        work.rename(final)
        load_version(final)  # what the server will do: refuse here, not there
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        if not any(model_dir.iterdir()):
            model_dir.rmdir()
        raise
