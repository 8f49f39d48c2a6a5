"""The container's health check: ``python -m gateway.healthcheck [CONFIG]``.

Asks ``/healthz`` of the admin listener where the config puts it (``admin.host`` and
``admin.port``), so the Dockerfile's HEALTHCHECK follows the config instead of assuming
port 9090. The config is ``CONFIG``, else ``$GATEWAY_CONFIG``, else
``/etc/gateway/gateway.yaml``. Exit 0 when it answers 200, 1 otherwise, with one line
saying why.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from gateway.config import ConfigError, load

DEFAULT_CONFIG = "/etc/gateway/gateway.yaml"
TIMEOUT_SECONDS = 2.0


def admin_url(host: str, port: int) -> str:
    """Where to reach an admin listener bound to ``host``: a wildcard address is reached
    on loopback."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"  # a name
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    shown = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{shown}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    path = args[0] if args else os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG)
    try:
        config = load(path)
    except ConfigError as error:
        print(f"unhealthy: {path}: {'; '.join(error.problems)}", file=sys.stderr)
        return 1
    url = admin_url(config.admin.host, config.admin.port) + "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (urllib.error.URLError, OSError) as error:
        print(f"unhealthy: {url}: {getattr(error, 'reason', error)}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
