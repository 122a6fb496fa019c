"""`python -m pangea.probe [FILE]`: a container health check that asks this role's own /healthz.

The role writes where its health server listens to PANGEA_HEALTH_FILE (the image sets it), so
the check needs no port of its own: it follows a role that took a free port (PANGEA_HTTP_PORT
unset or `any`, roles sharing a host's network), and the instance the server names must be
the one in the file, so reaching another process on that port fails the check.  Exit 0: alive
(or the server is off, so there is nothing to ask); 1: not, with one line saying why.
Standard library only: it runs every few seconds.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

# /healthz names the server that answered (pangea.telemetry sends it), so a check that reaches
# another process on the same port (roles sharing a host's network, a stale address) fails.
INSTANCE_HEADER = "X-Pangea-Instance"


def check(path: Path, timeout: float = 4.0) -> str | None:
    """Why the role that wrote `path` is not healthy; None when it is."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return f"{path} does not exist: the role has not started its health server (yet)"
    except (OSError, ValueError) as exc:
        return f"cannot read {path}: {exc}"
    if record.get("url") is None:
        return None  # PANGEA_HTTP_PORT=0: no server, nothing to ask
    url = f"{record['url']}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            instance = response.headers.get(INSTANCE_HEADER)
    except OSError as exc:
        return f"{url}: {exc}"
    if instance != record.get("instance"):
        return f"{url} is served by another process (instance {instance}, expected {record.get('instance')})"
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else os.environ.get("PANGEA_HEALTH_FILE")
    if not path:
        print(
            "pangea.probe: set PANGEA_HEALTH_FILE (or pass the file) to where the role writes its address",
            file=sys.stderr,
        )
        return 1
    problem = check(Path(path))
    if problem:
        print(f"pangea.probe: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
