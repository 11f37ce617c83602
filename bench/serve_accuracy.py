"""Serve a model over the 10k Fashion-MNIST test images through real HTTP and check the must-show figures.

    python bench/serve_accuracy.py                                 # starts `branchserve serve` on models/
    python bench/serve_accuracy.py --deadline-fractions 0.6,0.7,0.8,0.9
    python bench/serve_accuracy.py --url http://127.0.0.1:8000 --limit 2000

Passes over the test set, interleaved image by image so they share the host's load, each
image sent as a PNG body (converted by the server as the manifest says):
  default   the server's default operating point
  full      every input to the final exit (a request budget of max_accuracy_drop = 0)
  deadline  one pass per --deadline-fractions value: a deadline of that fraction × the median
            server latency of full-depth requests, measured first (after a warm-up) on 500 images
            sent as default and full-depth requests in turn, so the reference sees the same mix of
            requests (and caches) as the passes
Compute is measured two ways: the server's own stage time per request (`compute_ms`) and MACs
from the exit each input left at. Exits 1 if a criterion fails. Needs no torch.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from branchserve.fmnist import read_split
from branchserve.loadtest.servers import branchserve_cmd, free_port, started_server

ACCURACY_TOLERANCE = 0.005  # within 0.5 pp of the final exit
COMPUTE_RATIO_LIMIT = 0.45  # mean compute at most 0.45× of full depth
DEADLINE_MET_TARGET = 0.99
WARMUP_IMAGES = 250  # sent as default and full-depth requests first, not measured: a fresh server is slower
PROBE_IMAGES = 500  # then sent the same way to set the deadline before the passes


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def run_passes(
    url: str, model: str, bodies: list[bytes], passes: dict[str, dict[str, str]], concurrency: int
) -> dict[str, list[dict]]:
    """POST every body as image/png once per pass, the passes interleaved image by image so that all
    of them see the same load on a shared host; each response gets its client-side latency added."""

    def worker(indices: range) -> list[tuple[int, str, dict]]:
        out = []
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in indices:
                for name, params in passes.items():
                    t0 = time.perf_counter()
                    r = client.post(
                        f"/v1/models/{model}/predict",
                        content=bodies[i],
                        params=params,
                        headers={"content-type": "image/png"},
                    )
                    client_ms = (time.perf_counter() - t0) * 1e3
                    if r.status_code != 200:
                        raise SystemExit(f"request {i} ({name}): HTTP {r.status_code} {r.text}")
                    out.append((i, name, {**r.json(), "client_ms": client_ms}))
        return out

    chunks = [range(w, len(bodies), concurrency) for w in range(concurrency)]
    with ThreadPoolExecutor(concurrency) as pool:
        results = sorted((item for part in pool.map(worker, chunks) for item in part), key=lambda t: t[0])
    return {name: [r for _, n, r in results if n == name] for name in passes}


def summarise(responses: list[dict], labels: np.ndarray, cumulative_macs: np.ndarray) -> dict:
    exits = np.array([r["outputs"][0]["exit"] for r in responses])
    predicted = np.array([r["outputs"][0]["class"] for r in responses])
    latency = np.array([r["latency_ms"] for r in responses])
    client = np.array([r["client_ms"] for r in responses])
    summary = {
        "requests": len(responses),
        "accuracy": float((predicted == labels).mean()),
        "mean_compute_ms": float(np.mean([r["compute_ms"] for r in responses])),
        "mean_macs": float(cumulative_macs[exits].mean()),
        "exit_fractions": (np.bincount(exits, minlength=len(cumulative_macs)) / len(exits)).round(4).tolist(),
        "server_latency_ms": {"p50": float(np.median(latency)), "p99": float(np.percentile(latency, 99))},
        "client_latency_ms": {"p50": float(np.median(client)), "p99": float(np.percentile(client, 99))},
        "operating_point": responses[0]["budget"]["operating_point"],
    }
    if responses[0]["budget"]["deadline_ms"] is not None:
        missed = np.array([r["deadline_missed"] for r in responses])
        one_stage = np.array([r["stages_run"] == 1 for r in responses])
        summary["deadline_met"] = float(1 - missed.mean())
        summary["deadline_stopped"] = float(np.mean([r["deadline_stopped"] for r in responses]))
        # The first stage always runs: a miss with one stage is the host being slower than the
        # deadline allows; a miss after more is a stage predicted to fit that did not.
        summary["missed_with_first_stage_only"] = float((missed & one_stage).mean())
        summary["missed_after_a_predicted_stage"] = float((missed & ~one_stage).mean())
        summary["mean_overhead_ms"] = float(np.mean([r["latency_ms"] - r["compute_ms"] for r in responses]))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=Path("models"), help="repository to serve (ignored with --url)")
    ap.add_argument("--url", help="an already running server instead of starting one")
    ap.add_argument("--model", default="fmnist-resnet")
    ap.add_argument("--limit", type=int, help="first N test images only (default: all 10k)")
    ap.add_argument("--concurrency", type=int, default=1, help="client connections; 1 keeps timing clean on 2 cores")
    ap.add_argument(
        "--deadline-fractions",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[0.9],
        help="deadlines as fractions of the full chain's median server latency, comma-separated",
    )
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()

    images, labels = (a[: args.limit] for a in read_split("test"))
    bodies = [png(img) for img in images]

    with ExitStack() as stack:
        url = args.url
        if url is None:
            port = free_port()
            log = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "server.log"
            url = stack.enter_context(started_server(branchserve_cmd(args.repo, port), port, log)).url
        meta = httpx.get(f"{url}/v1/models/{args.model}").raise_for_status().json()
        cumulative_macs = np.array([e["cumulative_macs"] for e in meta["exits"]], dtype=float)
        full = {"max_accuracy_drop": "0"}
        mix = {"default": {}, "full": full}
        run_passes(url, args.model, bodies[:WARMUP_IMAGES], mix, args.concurrency)
        probe = run_passes(url, args.model, bodies[:PROBE_IMAGES], mix, args.concurrency)
        reference_ms = float(np.median([r["latency_ms"] for r in probe["full"]]))
        deadlines = {f"deadline {f:g}×": round(f * reference_ms, 3) for f in args.deadline_fractions}
        passes = {"default": {}, "full": full} | {k: {"deadline_ms": str(ms)} for k, ms in deadlines.items()}
        responses = run_passes(url, args.model, bodies, passes, args.concurrency)
        summaries = {name: summarise(responses[name], labels, cumulative_macs) for name in passes}
        one_stage = [r["latency_ms"] for r in responses["default"] if r["stages_run"] == 1]
        default, full = summaries["default"], summaries["full"]

    figures = {
        "model": f"{meta['name']}/{meta['version']}",
        "images": len(labels),
        "concurrency": args.concurrency,
        "manifest_final_exit_test_accuracy": meta["exits"][-1]["test_accuracy"],
        "default": default,
        "full": full,
        "full_depth_reference_ms": reference_ms,
        "first_stage_only_p99_ms": float(np.percentile(one_stage, 99)) if one_stage else None,
        "deadlines": {name: {"deadline_ms": ms, **summaries[name]} for name, ms in deadlines.items()},
        "accuracy_drop_pp": (full["accuracy"] - default["accuracy"]) * 100,
        "compute_ratio_stage_time": default["mean_compute_ms"] / full["mean_compute_ms"],
        "compute_ratio_macs": default["mean_macs"] / full["mean_macs"],
    }
    checks = {
        "accuracy within 0.5 pp of the final exit": full["accuracy"] - default["accuracy"] <= ACCURACY_TOLERANCE,
        "compute ≤ 0.45× full depth (stage time)": figures["compute_ratio_stage_time"] <= COMPUTE_RATIO_LIMIT,
        "compute ≤ 0.45× full depth (MACs)": figures["compute_ratio_macs"] <= COMPUTE_RATIO_LIMIT,
    } | {
        f"{name} = {ms} ms met by ≥ 99 %": summaries[name]["deadline_met"] >= DEADLINE_MET_TARGET
        for name, ms in deadlines.items()
    }
    figures["checks"] = checks
    text = json.dumps(figures, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
