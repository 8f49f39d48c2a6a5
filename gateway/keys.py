"""Where a route's sticky split key comes from (``split.key``), parsed once at load."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from aiohttp import web


class KeyKind(enum.Enum):
    REQUEST_ID = "request_id"
    HEADER = "header"
    COOKIE = "cookie"
    QUERY = "query"


@dataclass(frozen=True, slots=True)
class KeySource:
    """Where a route's sticky split key comes from (``split.key`` in the config)."""

    kind: KeyKind
    name: str = ""

    @classmethod
    def parse(cls, spec: str) -> KeySource:
        if spec == "request_id":
            # The usual key: one object for every route, so it stays in cache.
            return REQUEST_ID_KEY
        kind, _, name = spec.partition(":")
        return cls(KeyKind(kind), name)

    def extract(self, request: web.BaseRequest, request_id: str) -> str:
        """The key for this request. A request without the named header, cookie or
        query parameter falls back to its request ID, so it is still split by weight."""
        kind = self.kind
        if kind is KeyKind.REQUEST_ID:
            return request_id
        if kind is KeyKind.HEADER:
            value = request.headers.get(self.name)
        elif kind is KeyKind.COOKIE:
            value = request.cookies.get(self.name)
        else:
            value = request.query.get(self.name)
        return value if value else request_id


REQUEST_ID_KEY = KeySource(KeyKind.REQUEST_ID)
