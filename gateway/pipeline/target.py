"""The request target, before step 1: only origin-form (``/path?query``) is routed, on
its normalised path (``gateway.core.paths``), and that path is what goes upstream.

A request target in absolute-form (``GET http://host/x``) or authority-form (``CONNECT
host:443``) is refused with 400, as is a path that cannot be normalised; ``OPTIONS *``
(asterisk-form, about the server itself) is answered by the proxy with the methods it
relays. Parsing is remembered per distinct target, as the router remembers matches:
per request it costs a dict lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.paths import BadPath, normalise_path

# Distinct targets remembered; past it the memory starts over (a scan of random paths
# must not grow it without bound).
TARGET_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed request target: ``path`` normalised, and ``query`` as sent ("" or
    "?..."), which follows whatever path goes upstream."""

    path: str
    query: str
    upstream: str  # path + query: what goes upstream when no backend rewrites the path
    problem: str | None = None  # why it is refused (400 bad_request), if it is


class Targets:
    """Parses request targets, remembering each distinct one."""

    __slots__ = ("known",)

    def __init__(self) -> None:
        self.known: dict[str, Target] = {}  # by raw target, at most TARGET_CACHE_SIZE

    def get(self, raw: str) -> Target:
        found = self.known.get(raw)
        if found is None:
            found = parse_target(raw)
            known = self.known
            if len(known) >= TARGET_CACHE_SIZE:
                known.clear()
            known[raw] = found
        return found


def parse_target(raw: str) -> Target:
    """The target of a request line (not ``*``, which the proxy answers itself)."""
    if not raw.startswith("/"):
        form = "authority-form" if "/" not in raw else "absolute-form"
        return Target(
            "", "", "", f"only origin-form request targets (/path?query) are served, got {form}"
        )
    path, mark, query = raw.partition("?")
    try:
        normal = normalise_path(path)
    except BadPath as error:
        return Target("", "", "", f"bad request path: {error}")
    return Target(normal, mark + query, raw if normal == path else normal + mark + query)
