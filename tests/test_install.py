"""The serve-only install, as a user gets it: the wheel in a fresh virtual environment (no torch, no
matplotlib), every torch-free tool run from a folder outside the checkout, and the torch tools
saying which extra they need in one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from branchserve import __version__
from branchserve.loadtest.servers import free_port, started_server

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "fmnist-resnet" / "3"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
    )
    (built,) = out.glob("branchserve-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Iterator[Path]:
    """A fresh venv holding only the wheel and its base dependencies; yields its bin/ folder."""
    home = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(home)], check=True)
    pip = [str(home / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)]
    subprocess.run(pip, check=True)
    yield home / "bin"


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder outside the checkout, holding a copy of the shipped model in `repo/`."""
    cwd = tmp_path_factory.mktemp("user")
    shutil.copytree(SHIPPED, cwd / "repo" / "fmnist-resnet" / "3")
    return cwd


def run(venv: Path, cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, check=check)


def test_the_wheel_installs_one_namespace_with_its_data(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert z.read(top_level).decode().split() == ["branchserve"]
    assert {n.split("/")[0] for n in names} == {"branchserve", f"branchserve-{__version__}.dist-info"}
    samples = [n for n in names if n.startswith("branchserve/loadtest/samples/")]
    assert len(samples) == 501 and "branchserve/loadtest/samples/labels.txt" in samples
    assert {"branchserve/loadtest/budgets/ci.toml", "branchserve/loadtest/budgets/dev.toml"} <= set(names)
    assert "branchserve/server/static/swagger-ui/swagger-ui-bundle.js" in names
    assert {
        "branchserve/server/oip/proto/grpc_predict_v2.proto",
        "branchserve/server/oip/proto/grpc_predict_v2_pb2.pyi",
    } <= set(names)


def test_torch_free_tools_work_on_the_serve_only_install(venv: Path, outside: Path) -> None:
    absent = "import importlib.util as u; print([m for m in ('torch', 'matplotlib') if u.find_spec(m)])"
    assert run(venv, outside, "python", "-c", absent).stdout.strip() == "[]"
    assert run(venv, outside, "branchserve", "--version").stdout.strip() == f"branchserve {__version__}"

    tables = run(venv, outside, "branchserve", "inspect", "repo/fmnist-resnet/3", "--plot", "frontier.png").stdout
    assert "near-final *" in tables and "chain / full" in tables
    assert (
        tables.strip().splitlines()[-1]
        == "no plot: matplotlib is not installed; pip install 'branchserve[plot]' (matplotlib)"
    )
    assert not (outside / "frontier.png").exists()

    run(venv, outside, "branchserve", "calibrate", "repo/fmnist-resnet/3", "--batch-sizes", "1", "--runs", "60")
    manifest = (outside / "repo" / "fmnist-resnet" / "3" / "manifest.json").read_text()
    assert '"runs": 60' in manifest

    port = free_port()
    cmd = [str(venv / "branchserve"), "serve", "--repository", str(outside / "repo"), "--port", str(port)]
    with started_server(cmd, port, outside / "server.log") as server:
        check = run(venv, outside, "python", "-m", "branchserve.loadtest.predict_check", "--url", server.url)
    answers = check.stdout.strip().splitlines()
    assert len(answers) == 5 and all(": 200, class " in line for line in answers)
    log = server.log_text()
    assert "fmnist-resnet: serving versions [3]" in log
    assert "gRPC off: grpc is not installed (pip install 'branchserve[grpc]')" in log


def test_grpc_asked_for_without_the_extra_is_a_one_line_error(venv: Path, outside: Path) -> None:
    done = run(venv, outside, "branchserve", "serve", "--repository", "repo", "--grpc-port", "9", check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        == "branchserve serve: grpc_port 9: gRPC needs pip install 'branchserve[grpc]' (No module named 'grpc')"
    )


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        (["train", "--out", "run"], "train"),
        (["export", "run", "--name", "mine"], "train"),
        (["analyze", "run", "--out", "report"], "train"),
        (["study", "--grid", "weighting=equal", "--out", "study"], "train"),
        (["loadtest", "--budgets", "ci"], "loadtest"),
        (["ray", "--address", "auto"], "ray"),
    ],
)
def test_tools_that_need_an_extra_say_which_in_one_line(
    venv: Path, outside: Path, command: list[str], extra: str
) -> None:
    done = run(venv, outside, "branchserve", *command, check=False)
    assert done.returncode == 1 and done.stdout == ""
    pin = "torch==2.13.0 " if extra == "train" else ""
    assert done.stderr.splitlines() == [
        f"branchserve {command[0]}: this command needs the '{extra}' extra: pip install {pin}'branchserve[{extra}]'"
    ]


def test_serve_from_elsewhere_suggests_the_repository_flag(venv: Path, outside: Path) -> None:
    done = run(venv, outside, "branchserve", "serve", "--port", str(free_port()), check=False)
    assert done.returncode == 1
    assert done.stderr.strip().endswith("(pass --repository DIR or set BRANCHSERVE_REPOSITORY)")
