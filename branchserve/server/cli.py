"""`branchserve serve`: every setting is a flag here and a BRANCHSERVE_* variable (see server/settings.py)."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError
from pydantic_settings import CliSettingsSource

from branchserve.server.decoding import validation_message
from branchserve.server.settings import Settings


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from branchserve.repo.manifest import RepositoryError
    from branchserve.server.app import connection_guard, create_app
    from branchserve.server.transport import guarded_protocol

    try:
        settings = Settings(_cli_settings_source=args.settings_source(parsed_args=args))
    except ValidationError as e:  # one line, and never the value: it may be a token
        sys.exit(f"branchserve serve: {validation_message(e.errors(include_input=False))}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)-9s %(message)s")
    try:
        app = create_app(settings)
    except (RepositoryError, ValueError, OSError) as e:
        hint = "" if settings.repository.is_dir() else " (pass --repository DIR or set BRANCHSERVE_REPOSITORY)"
        sys.exit(f"branchserve serve: {e}{hint}")
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        http=guarded_protocol(connection_guard(app)),
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="serve a model repository over HTTP (no torch needed)")
    p.set_defaults(func=_serve, settings_source=CliSettingsSource(Settings, root_parser=p))
