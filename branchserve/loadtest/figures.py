"""How a bench reports: its figures as JSON with the host they were measured on, on stdout and in its
`--out` file, and an exit status that says whether every check held."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn


def report(figures: dict[str, Any], out: Path | None) -> NoReturn:
    """Print `figures` with the host's load average and cores, write them to `out` if given, and exit 0
    only if every entry of `figures["checks"]` holds."""
    figures = {**figures, "host": {"load_average": os.getloadavg(), "cpus": os.cpu_count()}}
    text = json.dumps(figures, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")
    sys.exit(0 if all(figures["checks"].values()) else 1)
