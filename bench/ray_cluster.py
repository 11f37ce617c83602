"""The Ray Serve application on a two-node Ray cluster on this machine, against `branchserve serve`.

    python bench/ray_cluster.py                        # ≈ 15 min on the 2-core box; needs wrk (Debian's package)
    python bench/ray_cluster.py --limit 500 --repeats 1 --seconds 3

One cluster (`ray.cluster_utils.Cluster`: a head and a second node, processes of this machine),
both layouts deployed on the shipped model at its default operating point — *replicas* by
`branchserve ray --config` with two fixed replicas (one per node), *stages* at `/stages` — and a
single-process server (`branchserve serve --workers 1`) on the same repository. Three parts:

1. **Answers**: the test images (`--limit`, all 10k by default) as PNGs through all three; every
   exit, class and confidence must be the same (exit 1 on a difference).
2. **Capacity** (bench/workers.py's method: wrk posting the shipped sample PNGs closed loop, more
   connections each step; the highest throughput with p99 ≤ `--p99-ms` and every answer 200), of
   the plain server, the replicas layout and the stages layout, taking turns in each repeat; then
   throughput, p50/p99 and the servers' CPU per request (every process of the Ray cluster, idle
   work included) of each at a fixed closed-loop load of 8 connections; medians.
3. **Hop cost**: sequential requests (one at a time), their latency by how many stages they ran
   (`stages_run`), replicas layout against stages layout. In the stages layout each stage a
   request runs is one more call to a stage deployment: the difference divided by the stages run
   is the cost of one hop (a handle call, the boundary tensor sent, the stage's batch wait); and,
   in this process, each stage's time per input alone and in a batch of 16, with the bytes of the
   tensor a hop into it carries.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ray
import yaml
from PIL import Image
from ray import serve
from ray.cluster_utils import Cluster
from workers import MODEL, ROOT, capacity_at, wrk

from branchserve.fmnist import read_split
from branchserve.loadtest.figures import report
from branchserve.loadtest.servers import Server, branchserve_cmd, cpu_seconds, free_port, started_server
from branchserve.ray.app import build
from branchserve.ray.args import AppArgs
from branchserve.repo.loading import load_version
from branchserve.repo.sessions import load_session
from branchserve.server.runtime import Stage

REPOSITORY = ROOT / "models"
PNG = {"content-type": "image/png"}
RETRIES = 20
SATURATING = 8  # connections of the fixed-load run: enough to keep every replica busy
Answer = tuple[int, int, float, int, float]  # exit, class, confidence, stages_run, client latency (ms)


def replicas_config(port: int) -> dict[str, Any]:
    """deploy/ray/config.yaml with two fixed replicas, so that each node holds one and runs don't rescale."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "deploy/ray/config.yaml").read_text())
    config |= {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port}}
    config["applications"][0]["args"]["settings"]["repository"] = str(REPOSITORY)
    config["applications"][0]["deployments"] = [{"name": MODEL, "num_replicas": 2, "autoscaling_config": None}]
    return config


def start_cluster(tmp: Path) -> tuple[Cluster, str]:
    """Two nodes of two logical CPUs each; both layouts deployed; the proxy's URL once both are ready."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    port = free_port()
    (tmp / "config.yaml").write_text(yaml.safe_dump(replicas_config(port)))
    cli = [sys.executable, "-m", "branchserve", "ray", "--config", str(tmp / "config.yaml")]
    subprocess.run([*cli, "--address", cluster.address, "--non-blocking"], check=True, capture_output=True)
    ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
    serve.run(
        build(AppArgs(settings={"repository": str(REPOSITORY)}, layout="stages")), name="stages", route_prefix="/stages"
    )
    url = f"http://127.0.0.1:{port}"
    for prefix in ("", "/stages"):
        while httpx.get(f"{url}{prefix}/v2/health/ready", timeout=10).status_code != 200:
            time.sleep(0.5)
    return cluster, url


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def answers(url: str, bodies: list[bytes], threads: int, params: dict[str, str] | None = None) -> list[Answer]:
    def one(client: httpx.Client, body: bytes) -> Answer:
        for _ in range(RETRIES):  # a 503 (a busy host's stall shed by admission): ask again, as it says
            start = time.perf_counter()
            r = client.post(f"/v1/models/{MODEL}/predict", content=body, headers=PNG, params=params)
            latency_ms = (time.perf_counter() - start) * 1e3
            if r.status_code != 503:
                break
            time.sleep(0.1)
        r.raise_for_status()
        out = r.json()["outputs"][0]
        return out["exit"], out["class"], out["confidence"], out["stages_run"], latency_ms

    with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda body: one(client, body), bodies))


def agreement(urls: dict[str, str], bodies: list[bytes]) -> dict[str, Any]:
    """Exits, classes and confidences of every image through each server, against the plain server's."""
    got = {name: [a[:3] for a in answers(url, bodies, 4)] for name, url in urls.items()}
    plain = got.pop("plain")
    exits = np.bincount([e for e, _, _ in plain]).tolist()
    return {"images": len(bodies), "plain_exit_counts": exits} | {
        f"{name}_differences": sum(a != b for a, b in zip(mine, plain, strict=True)) for name, mine in got.items()
    }


def hop_cost(url: str, bodies: list[bytes]) -> dict[str, Any]:
    """Median sequential latency by stages run, replicas vs stages layout; the extra per stage run."""
    by_depth: dict[str, dict[int, list[float]]] = {}
    for name, prefix in (("replicas", ""), ("stages", "/stages")):
        answers(url + prefix, bodies[:50], 1)  # warm up
        by_depth[name] = defaultdict(list)
        for params in ({}, {"max_accuracy_drop": "0"}):  # the default point, and one that goes deeper
            for *_, stages_run, ms in answers(url + prefix, bodies, 1, params):
                by_depth[name][stages_run].append(ms)
    medians = {name: {k: statistics.median(v) for k, v in sorted(d.items())} for name, d in by_depth.items()}
    per_hop = {
        k: (medians["stages"][k] - medians["replicas"][k]) / k for k in medians["replicas"] if k in medians["stages"]
    }
    return {"median_latency_ms_by_stages_run": medians, "hop_ms_by_stages_run": per_hop}


def stage_costs(batch: int = 16, repeats: int = 300) -> list[dict[str, float]]:
    """Each stage in this process: the boundary tensor it takes (bytes per input), and its time per
    input alone and in a batch of `batch` (what `@serve.batch` could save a stage deployment)."""
    version = max((d for d in (REPOSITORY / MODEL).iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
    manifest = load_version(version)
    x = np.random.default_rng(0).standard_normal((batch, *manifest.input.shape)).astype(np.float32)
    costs = []
    for spec in manifest.stages:
        stage = Stage(spec, load_session(version / spec.file))
        per_input = {}
        for n in (1, batch):
            start = time.perf_counter()
            for _ in range(repeats):
                stage(x[:n])
            per_input[n] = (time.perf_counter() - start) / repeats / n * 1e3
        costs.append(
            {
                "input_bytes": x[0].nbytes,
                "ms_per_input_alone": per_input[1],
                f"ms_per_input_batch_{batch}": per_input[batch],
            }
        )
        x = stage(x)[1]  # the boundary into the next stage (None after the last)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=10_000, help="test images for the answers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="each capacity step")
    parser.add_argument("--p99-ms", type=float, default=25.0)
    parser.add_argument("--hop-images", type=int, default=300, help="sequential requests per layout and point")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    bodies = [png(image) for image in read_split("test")[0][: args.limit]]
    port = free_port()
    cmd = branchserve_cmd(
        REPOSITORY, port, "--workers", "1", "--ladder", "{}", "--log-level", "warning"
    )  # as under Ray
    with tempfile.TemporaryDirectory() as tmp, started_server(cmd, port, Path(tmp) / "server.log") as plain:
        cluster, url = start_cluster(Path(tmp))
        try:
            figures = run(args, plain, url, bodies)
        finally:
            serve.shutdown()
            ray.shutdown()
            cluster.shutdown()
    report(figures, args.out)


def server_pids(plain: Server) -> dict[str, list[int]]:
    """The plain server's process, and Ray's: every other process this one started (the nodes'
    GCS, raylets, dashboard and agents, and below them the proxy, the controller and the replicas)."""
    me = os.getpid()
    children = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _ppid(d.name) == me]
    return {"plain": [plain.pid], "ray": [c for c in children if c != plain.pid]}


def _ppid(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def loaded(base: str, prefix: str, seconds: float, pids: list[int]) -> dict[str, Any]:
    """wrk at SATURATING connections, and the servers' CPU per answered request meanwhile."""
    before = sum(cpu_seconds(p) for p in pids)
    step = wrk(base, SATURATING, seconds, prefix)
    step["cpu_ms_per_request"] = (sum(cpu_seconds(p) for p in pids) - before) / max(step["ok"], 1) * 1e3
    return step


def run(args: argparse.Namespace, plain_server: Server, url: str, bodies: list[bytes]) -> dict[str, Any]:
    plain, pids = plain_server.url, server_pids(plain_server)
    agree = agreement({"plain": plain, "replicas": url, "stages": f"{url}/stages"}, bodies)
    print(json.dumps(agree), flush=True)
    servers = {"plain": (plain, ""), "replicas": (url, ""), "stages": (url, "/stages")}
    capacity: dict[str, list[float]] = {name: [] for name in servers}
    saturated: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    for r in range(args.repeats):
        print(f"repeat {r}:", flush=True)
        for name, (base, prefix) in servers.items():
            capacity[name].append(capacity_at(base, args.seconds, args.p99_ms, name, prefix)[0])
            saturated[name].append(loaded(base, prefix, args.seconds, pids["plain" if name == "plain" else "ray"]))
    median = {name: statistics.median(v) for name, v in capacity.items()}
    at_load = {
        name: {k: statistics.median(s[k] for s in steps) for k in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_request")}
        for name, steps in saturated.items()
    }
    figures = {
        "answers": agree,
        "capacity_rps": capacity,
        "median_capacity_rps": median,
        f"at_{SATURATING}_connections": at_load,
        "replicas_over_plain": {
            "capacity": ratio(median["replicas"], median["plain"]),
            f"rps_at_{SATURATING}_connections": ratio(at_load["replicas"]["rps"], at_load["plain"]["rps"]),
            "cpu_per_request": ratio(at_load["replicas"]["cpu_ms_per_request"], at_load["plain"]["cpu_ms_per_request"]),
        },
        "stages_over_replicas_capacity": ratio(median["stages"], median["replicas"]),
        "hops": hop_cost(url, bodies[: args.hop_images]),
        "stages_in_process": stage_costs(),
        "p99_ms_budget": args.p99_ms,
    }
    figures["checks"] = {
        f"both layouts answer the {len(bodies)} images exactly as the single-process server": (
            agree["replicas_differences"] == agree["stages_differences"] == 0
        ),
    }
    return figures


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


if __name__ == "__main__":
    main()
