"""The application: `build` is Ray Serve's application builder (`import_path: branchserve.ray.app:build`).

One ingress (ingress.py) and one deployment per model of the repository, named after the model
(predictor.py); in the stages layout also one deployment per stage of each version served, named
`<model>-v<version>-stage<k>` (stages.py). A Serve config file can override any of them by name
(deploy/ray/config.yaml). The repository is read where each replica runs, so every node needs it
at the same path (a shared volume, or baked into the image); a relative path is made absolute
where the application is built.

No `from __future__ import annotations` here: Ray Serve reads `build`'s annotation at run time to
validate a config file's `args` into `AppArgs` (and a string would not be a class).
"""

from pathlib import Path
from typing import cast

from ray.serve import Application, Deployment

from branchserve.ray.args import AppArgs
from branchserve.ray.ingress import Ingress
from branchserve.ray.predictor import Predictor
from branchserve.ray.stages import StageServer
from branchserve.repo.loading import load_version, model_dirs, version_dirs

# serve.deployment made these classes Deployments; Ray's annotations leave them classes.
INGRESS, PREDICTOR, STAGE = cast(Deployment, Ingress), cast(Deployment, Predictor), cast(Deployment, StageServer)


def build(args: AppArgs) -> Application:
    root = Path(args.server_settings().repository).resolve()
    args = args.model_copy(update={"settings": args.settings | {"repository": str(root)}})
    models = {d.name: model_deployment(args, d.name) for d in model_dirs(root)}
    return INGRESS.bind(args, models)


def model_deployment(args: AppArgs, name: str) -> Application:
    if args.layout == "replicas":
        return PREDICTOR.options(name=name).bind(args, name)
    settings = args.server_settings()
    on_disk = version_dirs(settings.repository / name)
    stages = {
        v: [
            STAGE.options(name=f"{name}-v{v}-stage{k}").bind(args, name, v, k)
            for k in range(len(load_version(on_disk[v]).stages))
        ]
        for v in settings.versions.select(on_disk)
    }
    return PREDICTOR.options(  # it only decodes and waits for its stages
        name=name,
        ray_actor_options={"num_cpus": 0.25},
        max_ongoing_requests=32,
        autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16},
    ).bind(args, name, stages)
