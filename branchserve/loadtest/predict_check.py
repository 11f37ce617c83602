"""Send real Fashion-MNIST PNGs to a running server and check the answers: CI's container check.

    BASE_URL=http://127.0.0.1:18080 python -m branchserve.loadtest.predict_check

Exits non-zero unless every answer is 200 with a class the model has. Prints each answer beside
the sample's true label (a wrong class is the model's business, not the deployment's). Standard
library only, so it runs on a serve-only install.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from branchserve.loadtest.samples import sample_labels, sample_path


def call(url: str, body: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, body, {"content-type": "image/png"} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:300]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("BASE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--model", default="fmnist-resnet")
    parser.add_argument("--count", type=int, default=5)
    args = parser.parse_args()
    base = f"{args.url.rstrip('/')}/v1/models/{args.model}"
    status, meta = call(base)
    if status != 200:
        sys.exit(f"GET {base}: HTTP {status}: {meta}")
    labels = meta["labels"]
    for i, truth in enumerate(sample_labels()[: args.count]):
        status, body = call(f"{base}/predict", sample_path(i).read_bytes())
        answer = body["outputs"][0] if status == 200 else None
        if answer is None or answer["class"] not in range(len(labels)):
            sys.exit(f"sample {i:04d}.png: HTTP {status}: {body}")
        print(
            f"sample {i:04d}.png: 200, class {answer['class']} ({answer['label']}) at exit {answer['exit']}, "
            f"confidence {answer['confidence']:.2f}; true label {truth} ({labels[truth]})"
        )


if __name__ == "__main__":
    main()
