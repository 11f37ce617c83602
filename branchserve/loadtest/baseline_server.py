"""The baseline: the plain FastAPI + ONNX Runtime server a user would write by hand for this model.

    python -m branchserve.loadtest.baseline_server --repository models --model fmnist-resnet --port 8001

One InferenceSession of the manifest's full graph (every input runs to the last exit), a sync
route (FastAPI runs it in its thread pool), the body as raw image bytes or JSON, no budgets,
no admission control, no metrics. It speaks enough of branchserve's API (predict, model metadata,
readiness) for the same locust users to drive it, so the load tests compare like with like.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import Body, FastAPI, HTTPException

from branchserve.repo.imaging import image_to_input, open_image
from branchserve.repo.loading import latest_version
from branchserve.repo.manifest import RepositoryError, load_manifest


def create_app(version_dir: Path) -> FastAPI:
    checked = load_manifest(version_dir)
    manifest = checked.model_dump(mode="json")
    spec, labels = checked.input, manifest["labels"]
    graph = manifest["full_graph"]
    session = ort.InferenceSession(str(version_dir / graph["file"]), providers=["CPUExecutionProvider"])
    input_name, output_name = graph["input_name"], graph["logits_outputs"][-1]

    def preprocess(body: bytes | dict) -> np.ndarray:
        """Images as the model was trained on them (the repository's conversion, which any client of
        the manifest could reimplement), or inputs already normalised."""
        if isinstance(body, bytes):
            x = image_to_input(open_image(body), spec)
        else:
            x = np.asarray(body["inputs"], np.float32)
        return x.reshape(-1, *spec.shape)

    app = FastAPI(title="baseline")

    @app.post(f"/v1/models/{manifest['name']}/predict")
    def predict(body: Annotated[Any, Body()]) -> dict:
        try:
            x = preprocess(body)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HTTPException(400, f"bad input: {e}") from None
        logits = session.run([output_name], {input_name: x})[0]
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        p = z / z.sum(axis=1, keepdims=True)
        classes = p.argmax(axis=1)
        return {
            "outputs": [
                {"class": int(c), "label": labels[c], "confidence": float(p[i, c])} for i, c in enumerate(classes)
            ]
        }

    @app.get(f"/v1/models/{manifest['name']}")
    def metadata() -> dict:
        return manifest

    @app.get("/v2/health/ready")
    def ready() -> dict:
        return {"ready": True}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fmnist-resnet")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    try:
        version_dir = latest_version(args.repository / args.model)
    except (RepositoryError, FileNotFoundError) as e:
        sys.exit(f"baseline_server: {e}")
    app = create_app(version_dir)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
