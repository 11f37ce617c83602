"""Where a PNG request's time goes outside HTTP: each part of decode → predict → encode, in-process.

    python bench/request_parts.py --requests 3000

Runs the server's own parts on the shipped sample PNGs, one request at a time, and prints the
median of each: reading the header (`parse_image`), decoding the pixels (`inputs()`), the stage
compute the answer reports (`compute_ms`), the rest of `ModelRuntime.run`, the rest of
`ServedModel.predict` (thresholds, metrics) and `encode_native`. What a client measures beyond
their sum is HTTP and ASGI (uvicorn, Starlette, FastAPI's routing): compare with
`bench/overhead_c1.py`. Needs no torch.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from branchserve.loadtest.samples import SAMPLES_DIR
from branchserve.repo.loading import load_version
from branchserve.repo.points import Policy
from branchserve.server.decoding import Limits, parse_image
from branchserve.server.encoding import encode_native
from branchserve.server.metrics import Metrics
from branchserve.server.predictor import ServedModel
from branchserve.server.runtime import ModelRuntime
from branchserve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version-dir", type=Path, default=ROOT / "models" / "fmnist-resnet" / "3")
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    m = load_version(args.version_dir)
    runtime = ModelRuntime(m, args.version_dir)
    served = ServedModel(runtime, Policy(), Metrics())
    settings = Settings()
    limits = Limits(settings.max_batch, tuple(settings.image_formats))
    bodies = [p.read_bytes() for p in sorted(SAMPLES_DIR.glob("*.png"))]
    parts: dict[str, list[float]] = {}
    for i in range(args.requests):
        body, t = bodies[i % len(bodies)], time.perf_counter
        t0 = t()
        request = parse_image(body, {}, m.input, limits)
        t1 = t()
        x = request.inputs()
        t2 = t()
        outcome = runtime.run(x, served.current().thresholds, runtime.num_exits - 1)
        t3 = t()
        result = served.predict(parse_image(body, {}, m.input, limits), t())
        t4 = t()
        encode_native(result)
        t5 = t()
        compute = sum(outcome.stage_seconds)
        for name, seconds in (
            ("read the PNG header", t1 - t0),
            ("decode the pixels", t2 - t1),
            ("stage compute (compute_ms)", compute),
            ("ModelRuntime.run beyond compute", t3 - t2 - compute),
            ("predict beyond header, pixels and run (thresholds, metrics)", (t4 - t3) - (t3 - t0)),
            ("encode_native", t5 - t4),
        ):
            parts.setdefault(name, []).append(seconds * 1e6)
    print(f"{m.name}/{m.version}, {args.requests} requests, load average {os.getloadavg()[0]:.2f}")
    for name, us in parts.items():
        print(f"{name}: median {np.median(us):.1f} µs")


if __name__ == "__main__":
    main()
