#!/usr/bin/env bash
# Set up a fresh machine for development and run the checks: lint, format, the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi
# torch is pinned to the CPU build this machine holds; a looser spec pulls a multi-GB CUDA build.
python3 -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]'
ruff check .
ruff format --check .
python3 -m pytest "$@"
