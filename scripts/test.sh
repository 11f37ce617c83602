#!/usr/bin/env bash
# Set up a machine for development and run the checks: lint, format, types, the test suite.
# Installs into ./.venv (made here unless a virtual environment is active). Debian's
# dataset-fashion-mnist, and prometheus for promtool (the alert rules' checks and unit tests), are
# installed with apt-get when missing: as root, or through sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] && [ -z "${BRANCHSERVE_FMNIST_DIR:-}" ]; then
    missing+=(dataset-fashion-mnist)
fi
command -v promtool >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"
fi
# torch is pinned to the CPU build this machine holds; a looser spec pulls a multi-GB CUDA build.
python -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]'
ruff check .
ruff format --check .
mypy  # strict, on the files pyproject.toml's [tool.mypy] lists
python -m pytest "$@"
