"""branchserve: train branched (multi-exit) classifiers, export them as staged ONNX, serve them with early exit."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("branchserve")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
