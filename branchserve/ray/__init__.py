"""branchserve as a Ray Serve application (`pip install 'branchserve[ray]'`; docs/deployment.md, "Ray cluster").

The same predictor as `branchserve serve` — decode (server/decoding.py), `ServedModel.predict`,
encode (server/encoding.py), models loaded and calibrated by `ModelRepository` — in Ray Serve
deployments, in one of two layouts (`app.py`): *replicas*, where each replica of a model's
deployment runs the whole staged model, and *stages*, where each stage is a deployment of its own
and only the inputs that did not leave at an exit travel on. Nothing in `branchserve.server`
imports this package or Ray.
"""
