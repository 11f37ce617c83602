"""`branchserve serve`: every setting is a flag here and a BRANCHSERVE_* variable (see server/settings.py)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import cast

from pydantic import ValidationError
from pydantic_settings import CliSettingsSource

from branchserve.server.decoding import validation_message
from branchserve.server.settings import Settings

WORKER_APP = "branchserve.server.app:worker_app"


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from branchserve.repo.loading import load_repository
    from branchserve.repo.manifest import RepositoryError
    from branchserve.server.app import create_app, optional_grpc
    from branchserve.server.transport import GuardedProtocol

    try:
        settings = Settings(_cli_settings_source=args.settings_source(parsed_args=args))
    except ValidationError as e:  # one line, and never the value: it may be a token
        sys.exit(f"branchserve serve: {validation_message(e.errors(include_input=False))}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)-9s %(message)s")
    host, port, log_level = settings.host, settings.port, settings.log_level
    try:
        if settings.workers == 1:
            app = create_app(settings)
            uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, http=GuardedProtocol)
            return
        optional_grpc(settings)  # a missing extra, or
        load_repository(settings.repository)  # a broken repository stop here, not in a loop of worker restarts
    except (RepositoryError, ValueError, OSError) as e:
        hint = "" if settings.repository.is_dir() else " (pass --repository DIR or set BRANCHSERVE_REPOSITORY)"
        sys.exit(f"branchserve serve: {e}{hint}")
    _serve_workers(settings)


def _serve_workers(settings: Settings) -> None:
    """`settings.workers` processes under uvicorn's supervisor, each listening on its own socket of the
    one port (server/workers.py)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from branchserve.server.transport import GuardedProtocol
    from branchserve.server.workers import ListenError, RunFolder, port_for_workers

    run = RunFolder.make()
    os.environ.update(settings.environment() | run.environment())
    host, port = settings.host, settings.port
    config = uvicorn.Config(
        WORKER_APP,
        factory=True,
        workers=settings.workers,
        host=host,
        port=port,
        log_level=settings.log_level,
        access_log=False,
        http=GuardedProtocol,
    )
    try:
        with port_for_workers(host, port) as listener:
            logging.getLogger("branchserve").info(
                "serving on http://%s:%d with %d workers", host, listener.port, settings.workers
            )
            Multiprocess(config, sockets=[cast(socket.socket, listener)]).run()  # each worker binds its own
    except ListenError as e:
        sys.exit(f"branchserve serve: {e}")
    except KeyboardInterrupt:
        pass
    finally:
        run.remove()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="serve a model repository over HTTP and gRPC (no torch needed)")
    p.set_defaults(func=_serve, settings_source=CliSettingsSource(Settings, root_parser=p))
