"""`branchserve serve`: every setting is a flag here and a BRANCHSERVE_* variable (see server/settings.py)."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic_settings import CliSettingsSource

from branchserve.server.settings import Settings


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from branchserve.repo.manifest import RepositoryError
    from branchserve.server.app import create_app

    settings = Settings(_cli_settings_source=args.settings_source(parsed_args=args))
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)-9s %(message)s")
    try:
        app = create_app(settings)
    except (RepositoryError, ValueError) as e:
        hint = "" if settings.repository.is_dir() else " (pass --repository DIR or set BRANCHSERVE_REPOSITORY)"
        sys.exit(f"branchserve serve: {e}{hint}")
    # One process: a second would duplicate every model and compete for the same cores.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="serve a model repository over HTTP (no torch needed)")
    p.set_defaults(func=_serve, settings_source=CliSettingsSource(Settings, root_parser=p))
