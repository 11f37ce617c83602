"""Does the exit-quality monitor stay quiet on the traffic it was certified for, and speak up on shifted
traffic? Replays of the 10k Fashion-MNIST test images through the monitor's own statistics, and a live
server for what the checks cost.

    nice -n 19 python bench/monitor_replay.py models/fmnist-resnet/3 --replays 100

The watched points are a deployment's rungs: the server's point `{"max_disagreement": 0.01, "risk":
0.05}` and the ladder's rungs for 0.02 and 0.05, each checked against its ε with the server's
defaults (`monitor_risk` 0.05 split over the points). Every exit's confidence and class per image come
from the model's full graph; each replay shuffles the images, samples each with probability
`--fraction` (and, to stress the statistics, every image), and feeds the samples one at a time to
`QualityCheck`, exactly as the server's monitor thread does.

* False alarms: replays with any alarm, out of `--replays`, at `--fraction` and at 1.
* Shifted traffic (branchserve/loadtest/shifts.py: noise, blur, contrast, rotation, letters): requests
  until the first alarm at `--fraction`, over `--shift-repeats` orders, capped at `--cap` requests.
* Extra compute: a live server at the default `monitor_fraction`, sent the test images open-loop;
  the monitor's MACs and seconds over the MACs and stage seconds served (from /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from branchserve.fmnist import read_split
from branchserve.loadtest.openloop import request_bytes, run
from branchserve.loadtest.servers import branchserve_cmd, free_port, started_server
from branchserve.loadtest.shifts import SHIFTS
from branchserve.repo.certify import cheapest_certified
from branchserve.repo.confidence import confidence, softmax
from branchserve.repo.loading import load_version
from branchserve.repo.manifest import Manifest
from branchserve.repo.quality import QualityCheck
from branchserve.repo.scoring import exit_logits

TARGETS = (0.01, 0.02, 0.05)
POLICY = '{"max_disagreement": 0.01, "risk": 0.05}'
LADDER = '{"p99_ms": 25, "risk": 0.05, "max_disagreement": [0.02, 0.05]}'


def traces(version_dir: Path, m: Manifest, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exits, n) confidence and class of every exit for every image, as a finished trace holds them."""
    probs = [softmax(z.astype(np.float32)) for z in exit_logits(version_dir, m, images)]
    return np.stack([confidence(p, m.confidence) for p in probs]), np.stack([p.argmax(axis=1) for p in probs])


def watched(m: Manifest) -> list[tuple[str, tuple[float, ...], float]]:
    points = [(cheapest_certified(m, "disagreement", eps, 0.05)[0], eps) for eps in TARGETS]
    return [(p.name, tuple(p.thresholds), eps) for p, eps in points]


def first_alarm(
    conf: np.ndarray, classes: np.ndarray, order: np.ndarray, picked: np.ndarray, points: list, alpha: float
) -> tuple[int | None, str | None]:
    """Requests until the first alarm when the images come in `order`, `picked` saying which are sampled."""
    check = QualityCheck(alpha)
    check.watch(points)
    for request, (i, sampled) in enumerate(zip(order, picked, strict=True), start=1):
        if sampled:
            events = check.observe(conf[:, i : i + 1], classes[:, i : i + 1])
            if events:
                return request, events[0][0].name
    return None, None


def false_alarms(
    conf: np.ndarray, classes: np.ndarray, points: list, replays: int, fraction: float, alpha: float
) -> int:
    alarms = 0
    for seed in range(replays):
        rng = np.random.default_rng(seed)
        order = rng.permutation(conf.shape[1])
        alarms += first_alarm(conf, classes, order, rng.random(len(order)) < fraction, points, alpha)[0] is not None
    return alarms


def detection(
    conf: np.ndarray, classes: np.ndarray, points: list, args: argparse.Namespace
) -> list[tuple[int | None, str | None]]:
    out = []
    for seed in range(args.shift_repeats):
        rng = np.random.default_rng(1000 + seed)
        order = np.concatenate([rng.permutation(conf.shape[1]) for _ in range(-(-args.cap // conf.shape[1]))])[
            : args.cap
        ]
        out.append(first_alarm(conf, classes, order, rng.random(len(order)) < args.fraction, points, args.alpha))
    return out


def live_cost(version_dir: Path, images: np.ndarray, rate: float) -> dict[str, float]:
    """Monitor compute over served compute, from a live server's /metrics after the test images open-loop."""
    m, port = load_version(version_dir), free_port()
    path = f"/v1/models/{m.name}/predict"
    requests = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        requests.append(request_bytes("127.0.0.1", path, buf.getvalue(), "image/png"))
    cmd = branchserve_cmd(
        version_dir.parent.parent, port, "--operating-point", POLICY, "--ladder", LADDER, "--log-level", "warning"
    )
    with tempfile.TemporaryDirectory() as tmp, started_server(cmd, port, Path(tmp) / "server.log") as server:
        outcome = asyncio.run(run("127.0.0.1", port, requests, rate, len(requests) / rate, connections=64))
        metrics = {}
        for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
            for s in family.samples:
                metrics[s.name] = metrics.get(s.name, 0.0) + (s.value if not s.name.endswith("_bucket") else 0.0)
    return {
        "answered": sum(s == 200 for s in outcome.status),
        "sampled": metrics["branchserve_monitor_sampled_inputs_total"],
        "dropped": metrics["branchserve_monitor_dropped_inputs_total"],
        "extra_macs_ratio": metrics["branchserve_monitor_compute_macs_total"]
        / metrics["branchserve_compute_macs_total"],
        "extra_seconds_ratio": metrics["branchserve_monitor_compute_seconds_total"]
        / metrics["branchserve_stage_duration_seconds_sum"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version_dir", type=Path)
    parser.add_argument("--replays", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.02, help="the server's default monitor_fraction")
    parser.add_argument("--alpha", type=float, default=0.05, help="the server's default monitor_risk")
    parser.add_argument("--shift-repeats", type=int, default=20)
    parser.add_argument("--cap", type=int, default=200_000, help="requests of shifted traffic before giving up")
    parser.add_argument("--rate", type=float, default=300.0, help="requests/s of the live cost run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    m = load_version(args.version_dir)
    images, _ = read_split("test")
    conf, classes = traces(args.version_dir, m, images)
    points = watched(m)
    result: dict[str, object] = {"points": [(name, eps) for name, _, eps in points]}
    result["false_alarms"] = {
        f: false_alarms(conf, classes, points, args.replays, f, args.alpha) for f in (args.fraction, 1.0)
    }
    print(f"watched: {result['points']}; false alarms out of {args.replays} replays: {result['false_alarms']}")
    shifted = {}
    for name, shift in SHIFTS.items():
        s_conf, s_classes = traces(args.version_dir, m, shift(images, np.random.default_rng(7)))
        runs = detection(s_conf, s_classes, points, args)
        found = [r for r, _ in runs if r is not None]
        shifted[name] = {
            "alarmed": len(found),
            "median_requests": float(np.median(found)) if found else None,
            "max_requests": max(found) if found else None,
            "first_point": sorted({p for _, p in runs if p}),
        }
        print(f"{name}: {shifted[name]}", flush=True)
    result["shifted"] = shifted
    result["live"] = live_cost(args.version_dir, images, args.rate)
    print(f"live, monitor_fraction default: {result['live']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    ok = (
        max(result["false_alarms"].values()) <= args.alpha * args.replays and result["live"]["extra_macs_ratio"] <= 0.05
    )
    print("monitor: " + ("held" if ok else "MISSED"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
