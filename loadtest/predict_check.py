"""Send real Fashion-MNIST PNGs to a running server and check the answers: CI's container check.

    BASE_URL=http://127.0.0.1:18080 python -m loadtest.predict_check

Exits non-zero unless every answer is 200 with a class the model has. Prints each answer beside
the sample's true label (a wrong class is the model's business, not the deployment's).
"""

from __future__ import annotations

import argparse
import os
import sys

import httpx

from loadtest.make_samples import LABELS_FILE, SAMPLES_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("BASE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--model", default="fmnist-resnet")
    parser.add_argument("--count", type=int, default=5)
    args = parser.parse_args()
    truth = [int(line) for line in (SAMPLES_DIR / LABELS_FILE).read_text().split()][: args.count]
    with httpx.Client(base_url=args.url, timeout=10) as client:
        labels = client.get(f"/v1/models/{args.model}").raise_for_status().json()["labels"]
        for i, label in enumerate(truth):
            png = (SAMPLES_DIR / f"{i:04d}.png").read_bytes()
            r = client.post(f"/v1/models/{args.model}/predict", content=png, headers={"content-type": "image/png"})
            answer = r.json()["outputs"][0] if r.status_code == 200 else None
            if answer is None or answer["class"] not in range(len(labels)):
                sys.exit(f"sample {i:04d}.png: HTTP {r.status_code}: {r.text[:300]}")
            print(
                f"sample {i:04d}.png: 200, class {answer['class']} ({answer['label']}) at exit {answer['exit']}, "
                f"confidence {answer['confidence']:.2f}; true label {label} ({labels[label]})"
            )


if __name__ == "__main__":
    main()
