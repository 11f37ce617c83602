"""Export a trained run as a model-repository version: staged ONNX, calibration, frontier, manifest.

One job per module, in the order an export runs them: `graphs` (the full graph and the stage graphs
cut from it), `numerics` (they compute what torch computes), `calibration` (exit scores, reliability,
the frontier), `assemble` (a version's files and manifest) and `publish` (the version folder, which
appears in the repository complete or not at all).
"""


class ExportError(RuntimeError):
    """An export that would produce a wrong or unloadable model version; nothing was written."""
