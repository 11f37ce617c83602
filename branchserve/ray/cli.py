"""`branchserve ray`: the model repository as a Ray Serve application, on a Ray cluster or this machine.

A command of its own rather than a flag of `branchserve serve`: nearly every flag of `serve` (the
port's admission, `--workers`, gRPC, timeouts) belongs to Ray Serve under Ray, so they would be
flags that silently do nothing. It fills a Serve config file (deploy/ray/config.yaml, or one like
it) from its flags and runs Ray Serve's own `serve run` on it, so `branchserve ray` and
`serve run deploy/ray/config.yaml` deploy exactly the same way.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

IMPORT_PATH = "branchserve.ray.app:build"
DEFAULT_APPLICATION = {"name": "branchserve", "route_prefix": "/", "import_path": IMPORT_PATH}
DEFAULT_HTTP = {"host": "127.0.0.1", "port": 8000}


def serve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The Serve config to run: `--config` (or a default), with the flags applied to it."""
    import yaml

    from branchserve.ray.args import AppArgs
    from branchserve.repo.loading import model_dirs

    config: dict[str, Any] = (
        yaml.safe_load(args.config.read_text())
        if args.config
        else {"http_options": dict(DEFAULT_HTTP), "applications": [dict(DEFAULT_APPLICATION)]}
    )
    apps = [a for a in config.get("applications", []) if a.get("import_path") == IMPORT_PATH]
    if len(apps) != 1:
        raise ValueError(f"{args.config}: needs exactly one application with import_path {IMPORT_PATH}")
    app_args = apps[0].setdefault("args", {})
    settings = app_args.setdefault("settings", {})
    for flag, value in (("repository", args.repository), ("operating_point", args.operating_point)):
        if value is not None:
            settings[flag] = str(value)
    settings["repository"] = str(Path(settings.get("repository", "models")).resolve())  # where this command runs
    model_dirs(Path(settings["repository"]))  # no such folder: a one-line error here
    if args.layout:
        app_args["layout"] = args.layout
    AppArgs.model_validate(app_args)  # a bad argument stops here, in one line, not in the cluster's log
    http = config.setdefault("http_options", {})
    http.update({k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    return config


def _run(args: argparse.Namespace) -> None:
    import ray  # noqa: F401  # the 'ray' extra, or the command's one-line install hint
    import yaml

    from branchserve.server.decoding import validation_message

    try:
        config = serve_config(args)
    except ValidationError as e:
        sys.exit(f"branchserve ray: {validation_message(e.errors(include_input=False), 'args')}")
    except (ValueError, OSError) as e:
        sys.exit(f"branchserve ray: {e}")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="branchserve-ray-") as f:
        yaml.safe_dump(config, f, sort_keys=False)
        f.flush()
        cmd = [sys.executable, "-m", "ray.serve.scripts", "run", f.name]
        cmd += ["--address", args.address] if args.address else []
        cmd += ["--non-blocking"] if args.non_blocking else []
        proc = subprocess.Popen(cmd)
        # `serve run` shuts the application down on Ctrl-C; a SIGTERM (docker stop) gets it the same way.
        signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGINT))
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # the terminal sent SIGINT to both: let `serve run` finish its shutdown
            code = proc.wait()
    sys.exit(code)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ray",
        help="serve the model repository as a Ray Serve application (needs branchserve[ray])",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--address", help="the Ray cluster: auto (the one this node belongs to) or HOST:PORT; none: start Ray here"
    )
    p.add_argument("--config", type=Path, help="a Serve config file like deploy/ray/config.yaml; flags override it")
    p.add_argument("--layout", choices=["replicas", "stages"], help="default: replicas (or the config file's)")
    p.add_argument("--repository", type=Path, help="model repository, at this path on every node (default: models)")
    p.add_argument("--operating-point", help="server operating point as JSON, e.g. '{\"max_accuracy_drop\": 0.005}'")
    p.add_argument("--host", help=f"address Ray Serve's proxies bind (default: {DEFAULT_HTTP['host']})")
    p.add_argument("--port", type=int, help=f"port of Ray Serve's proxies (default: {DEFAULT_HTTP['port']})")
    p.add_argument(
        "--non-blocking", action="store_true", help="deploy and return; the application stays on the cluster"
    )
    p.set_defaults(func=_run)
