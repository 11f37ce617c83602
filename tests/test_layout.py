"""The import direction of docs/architecture.md, read from the code: the contract imports neither side,
training and the server never import each other, and the package installs one top-level name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "branchserve"

# package → the branchserve packages it must not import
FORBIDDEN = {
    "repo": {"server", "training", "loadtest", "ray", "cli"},
    "server": {"training", "loadtest", "ray", "cli"},
    "training": {"server", "loadtest", "ray", "cli"},
    "loadtest": {"training", "ray", "cli"},
    "ray": {"training", "loadtest", "cli"},
}


def imported_packages(path: Path) -> set[str]:
    """The branchserve sub-packages (or top-level modules) a file imports, e.g. {"repo", "fmnist"}."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.level == 0
            else []
        )
        found |= {name.split(".")[1] for name in names if name.startswith("branchserve.")}
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_follow_the_architecture(package: str) -> None:
    files = sorted((PACKAGE / package).rglob("*.py"))
    assert files
    wrong = {str(f.relative_to(PACKAGE)): imported_packages(f) & FORBIDDEN[package] for f in files}
    assert {f: sorted(w) for f, w in wrong.items() if w} == {}
