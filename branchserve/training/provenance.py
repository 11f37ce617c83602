"""The git state of the code that trains or exports, recorded beside every run and model version."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Checkout:
    """HEAD of the checkout this package runs from, and whether tracked files differ from it
    (both None outside a git checkout, e.g. an installed wheel)."""

    commit: str | None
    uncommitted_changes: bool | None


def checkout() -> Checkout:
    """One `git status` call: porcelain v2 prints HEAD's sha as `# branch.oid` and a line per changed file."""
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain=v2", "--branch", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        )
    except OSError:
        return Checkout(None, None)
    if status.returncode != 0:
        return Checkout(None, None)
    lines = status.stdout.splitlines()
    oid = next((line.split()[2] for line in lines if line.startswith("# branch.oid ")), None)
    commit = oid if oid and oid != "(initial)" else None
    return Checkout(commit, any(not line.startswith("#") for line in lines))
