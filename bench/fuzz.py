"""Fuzz the served OpenAPI schema with schemathesis: no 5xx, no disagreement between schema and server.

    python bench/fuzz.py --max-examples 2000          # ≈ 26,000 generated requests, ≈ 6 min

Starts `branchserve serve` on the shipped model with an admin token and an API key (the same
bearer, so every generated request is authorised and reaches the code it targets), runs
`schemathesis run` with every check, then checks the server is still live and logged no traceback.
Disagreements that cannot be removed are listed in docs/serving.md; this script prints every
failure schemathesis reports and exits 1 unless all of them are among those (`KNOWN`).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from branchserve.loadtest.servers import branchserve_cmd, free_port, started_server

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "fuzz-token-0123456789abcdef"
KNOWN = {
    # A schema cannot say that these bytes must be a PNG or a JPEG.
    "not an image of an accepted format",
    "cannot decode image",
    # Nor that nested arrays must be rectangular and of the model's input shape.
    "inputs of shape",
    "inputs must be a rectangular array",
    # Nor how long this model's first stage takes on this host (the lower bound of a useful deadline).
    "is shorter than the first stage alone takes here",
    # An OIP inference body is the protocol's (JSON, or JSON followed by binary tensors), not modelled in
    # OpenAPI, so a request without one looks valid to the schema; it is 400.
    "empty body",
    # A load of a model folder that is not there is 400, as Triton answers every failed load.
    "failed, nothing changed: no model folder",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=1200, help="per operation and phase (default 1200)")
    parser.add_argument("--seed", type=int, default=20261130)
    args = parser.parse_args()
    port = free_port()
    env = {"BRANCHSERVE_ADMIN_TOKEN": TOKEN, "BRANCHSERVE_API_KEYS": TOKEN}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        cmd = branchserve_cmd(ROOT / "models", port, "--log-level", "warning")
        with started_server(cmd, port, log, env) as server:
            run = subprocess.run(
                [
                    "schemathesis", "run", f"{server.url}/openapi.json", "--checks", "all",
                    "--max-examples", str(args.max_examples), "--seed", str(args.seed),
                    "-H", f"Authorization: Bearer {TOKEN}", "--no-color",
                ],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            (Path(tmp) / "st.txt").write_text(run.stdout)
            with urllib.request.urlopen(server.url + "/v2/health/live", timeout=5) as live:
                alive = live.status == 200
            server_log = server.log_text()
    out = run.stdout
    generated = int(m.group(1)) if (m := re.search(r"(\d+) generated", out)) else 0
    details = re.findall(r'`\{"(?:detail|error)":"([^"]*)', out)
    server_errors = len(re.findall(r"^\[5\d\d\]", out, re.M))
    unknown = [d for d in details if not any(k in d for k in KNOWN)]
    print(out[out.find("SUMMARY") - 40 :] if "SUMMARY" in out else out[-3000:])
    print(f"generated {generated} requests; 5xx answers {server_errors}; server live afterwards: {alive}")
    print(f"failures explained in docs/serving.md: {len(details) - len(unknown)}; unexplained: {len(unknown)}")
    for detail in unknown:
        print(f"  UNEXPLAINED: {detail}")
    traceback = "Traceback" in server_log
    print(f"tracebacks in the server log: {traceback}")
    sys.exit(0 if alive and not unknown and not server_errors and not traceback else 1)


if __name__ == "__main__":
    main()
