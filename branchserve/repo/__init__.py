"""The model-repository contract: what training writes and the server reads, with no torch and no HTTP.

A model version is a folder `<repository>/<name>/<version>/` of ONNX stage graphs, the full graph
and `manifest.json` (manifest.py). Around it: loading and checking versions (loading.py), the
confidence measures exits are scored with (confidence.py), the threshold search and cost
arithmetic (frontier.py), budgets → operating points (points.py), images → model inputs
(imaging.py), ONNX Runtime sessions (sessions.py), latency profiling (profiling.py), and the
`calibrate` and `inspect` commands (calibrate.py, report.py, plot.py, cli.py).
"""
