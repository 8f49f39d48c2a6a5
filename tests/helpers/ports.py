"""Free TCP ports for the tests and the benchmark harness, which start servers in other
processes and must name their ports up front.

Asking the kernel for port 0 and closing the socket again is not enough:

- two such calls in a row return the same port about once in 15,000 pairs, and a
  gateway whose ``server.port`` equals its ``admin.port`` is a config error;
- the kernel hands the same range out to every outgoing connection, so a port picked
  there may be some client's source port by the time the server binds it.

So ports are drawn from below the kernel's ephemeral range, never the same one twice in
a process, and each is checked to be bindable at the time it is handed out.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Below this, ports belong to well-known and registered services more often.
_LOWEST = 10_000
_DEFAULT_EPHEMERAL_START = 32_768  # Linux's default when /proc cannot tell

_handed_out: set[int] = set()
_draw = random.Random()


def _ephemeral_start() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_START


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, outside the kernel's ephemeral range, and
    different from every other port this process was given."""
    top = _ephemeral_start()
    if top - _LOWEST < 1_000:  # an unusual range leaves too little room below it
        return _kernel_port(host)
    for _ in range(200):
        port = _draw.randrange(_LOWEST, top)
        if port not in _handed_out and _bindable(host, port):
            _handed_out.add(port)
            return port
    return _kernel_port(host)


def _kernel_port(host: str) -> int:
    """The kernel's choice (in the ephemeral range), still never one handed out before."""
    for _ in range(1_000):
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port left that this process was not given already")
